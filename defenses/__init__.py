"""Defenses: the registry, the contract and one module per defense."""
from . import ft, none  # noqa: F401  (registers the built-in defenses)
from .base import DEFENSES, CleanData, get_defense, register_defense

__all__ = ["DEFENSES", "CleanData", "get_defense", "register_defense"]
