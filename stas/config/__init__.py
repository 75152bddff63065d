"""Structured configs: the dataclass schemas of every config group (schema.py), the checks of a composed config
(validation.py) and of command-line overrides before Hydra composes (overrides.py).

Command-line overrides are checked against the schemas before Hydra composes (`check_override`: a key that is not
a field, a value of the wrong type); `validate` then checks values (ranges, finite numbers) and cross-field rules at
start-up, before any model is loaded, and raises `ConfigError` naming the field, the value and what is allowed.
"""

from stas.config.overrides import check_override, config_groups
from stas.config.schema import (EXPERIMENTS_DIR, SCHEMAS, AnalysisConfig, ModelConfig, PlantConfig, SteerConfig,
                                StasConfig, load_group_option, path_safe, register_configs)
from stas.config.validation import NUMERIC_BOUNDS, validate, validate_paths
from stas.errors import ConfigError

__all__ = [
    "check_override", "config_groups", "EXPERIMENTS_DIR", "SCHEMAS", "AnalysisConfig", "ModelConfig", "PlantConfig",
    "SteerConfig", "StasConfig", "load_group_option", "path_safe", "register_configs", "NUMERIC_BOUNDS", "validate",
    "validate_paths", "ConfigError",
]
