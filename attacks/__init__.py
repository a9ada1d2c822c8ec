"""Attacks: the registry, triggers and one module per attack.

Every module in this package is imported here, so a new attack is one new
file (its ``@register_attack`` runs on import); third-party attacks register
through the ``defbench.attacks`` entry-point group instead.
"""
import importlib
import pkgutil

from .base import ATTACKS, AttackInputs, get_attack, register_attack
from .triggers import TRIGGER_TYPES, PatchTrigger, TriggerSettings, trigger_from_description

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ATTACKS", "AttackInputs", "get_attack", "register_attack", "PatchTrigger", "TriggerSettings",
           "TRIGGER_TYPES", "trigger_from_description"]
