"""Core: component registry, YAML configs and errors."""

from __future__ import annotations

from genlab.core.config import load_config, save_config
from genlab.core.errors import ConfigError, GenlabError
from genlab.core.registry import (build, construct, describe, lookup, name_of, register, register_namespace,
                                  registered)

__all__ = [
    "ConfigError",
    "GenlabError",
    "build",
    "construct",
    "describe",
    "load_config",
    "lookup",
    "name_of",
    "register",
    "register_namespace",
    "registered",
    "save_config",
]
