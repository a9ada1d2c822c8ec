"""Defenses: the registry, the contract and one module per defense.

Every module in this package is imported on first use, so a new defense only
needs a file here with a ``@register_defense`` class; third-party packages
register through the ``defbench.defenses`` entry-point group instead.
"""
import importlib
import pkgutil

from .base import (DEFENSES, DETECTORS, MEASUREMENTS, CleanData, Detector, Measurement, get_defense,
                   register_defense, register_detector, register_measurement)
from .pretrain_data import REMOVED_RECORD, PretrainData, needs_pretrain_data

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEFENSES", "DETECTORS", "MEASUREMENTS", "CleanData", "Detector", "Measurement", "get_defense",
           "register_defense", "register_detector", "register_measurement", "PretrainData", "REMOVED_RECORD",
           "needs_pretrain_data"]
