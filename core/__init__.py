"""Neutral building blocks shared by every layer: the one registry type, typed settings, user errors."""
from .config import build_config, coerce
from .errors import ConfigError, RegistryError, UserError
from .registry import Component, ComponentRegistry, Registry, unknown_name_message

__all__ = ["Component", "ComponentRegistry", "ConfigError", "Registry", "RegistryError", "UserError", "build_config",
           "coerce", "unknown_name_message"]
