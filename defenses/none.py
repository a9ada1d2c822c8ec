"""The undefended baseline: returns the suspect encoder as it is."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_defense


@dataclass
class NoDefenseConfig:
    pass


@register_defense("none", config=NoDefenseConfig, summary="no defense: the suspect encoder as it is")
def no_defense(encoder, clean, cfg, ctx):
    return encoder
