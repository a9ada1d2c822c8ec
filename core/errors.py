"""The user-error base class: bad input, reported by the command line as one line that says what to do."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the command line prints its message as one line, never a traceback."""


class RegistryError(UserError, KeyError):
    """An unknown or doubly registered name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(UserError):
    """A profile or override that does not fit; the message names the key and what it expects."""
