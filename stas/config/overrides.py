"""Command-line overrides checked against the schemas before Hydra composes: a key that is not a field, a value of
the wrong type, a group that does not exist."""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass

from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from stas.config.schema import StasConfig
from stas.config.validation import NUMERIC_BOUNDS, not_a_field
from stas.errors import ConfigError
from stas.paths import CONF_DIR

TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def config_groups() -> set[str]:
    """The config groups of conf/ ('steer/window' for nested ones) and `experiment`: an override of one chooses an
    option, which Hydra checks (it also knows the options of added search paths)."""
    folders = (path.relative_to(CONF_DIR).as_posix() for path in CONF_DIR.rglob("*") if path.is_dir())
    return {"experiment", *folders}


def check_override(key: str, values: list | None, groups: set[str]) -> None:
    """Refuse, naming the field, an override of a key the schema does not have or a value its field cannot hold.

    Hydra would answer a typo with "Could not override ... To append to your config use +key" (and accept `+key`
    silently), and a wrong type with a multi-line merge error. `values` are the override's parsed values (every value
    of a sweep; None when they are not known before composing, e.g. interval sweeps).
    """
    if key in groups or "/" in key:
        return
    schema, parts = StasConfig, key.split(".")
    for depth, name in enumerate(parts):
        known = {f.name for f in fields(schema)}
        if name not in known:
            raise ConfigError(not_a_field(".".join(parts[: depth + 1]), known))
        kind = _field_kind(schema, name)
        if depth < len(parts) - 1:
            if not is_dataclass(kind):
                return  # a key inside a list or Any field: its value is checked after composing
            schema = kind
    if kind not in TYPE_NAMES:
        return
    for value in values or []:
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved, then checked, after composing
        try:
            OmegaConf.structured(schema)[name] = value
        except ValidationError:
            bounds = NUMERIC_BOUNDS.get(key)
            raise ConfigError(f"{key}={value!r} must be {TYPE_NAMES[kind]}{f' in {bounds}' if bounds else ''}") from None


def _field_kind(schema, name: str):
    """The type of a schema field, without Optional."""
    hint = typing.get_type_hints(schema)[name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint
