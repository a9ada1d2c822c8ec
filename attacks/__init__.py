"""Attacks: the registry, triggers and one module per attack."""
from . import badencoder, bassl  # noqa: F401  (registers the built-in attacks)
from .base import ATTACKS, AttackInputs, get_attack, register_attack
from .triggers import TRIGGER_TYPES, PatchTrigger, TriggerSettings, trigger_from_description

__all__ = ["ATTACKS", "AttackInputs", "get_attack", "register_attack", "PatchTrigger", "TriggerSettings", "TRIGGER_TYPES",
           "trigger_from_description"]
