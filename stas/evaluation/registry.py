"""The evaluator registry: name -> Evaluator class, complete once stas.evaluation.evaluators is imported (it imports
every evaluator module; each registers its own classes with stas.evaluation.base.register)."""

from __future__ import annotations

import stas.evaluation.evaluators  # noqa: F401  (imports every evaluator module: they fill REGISTRY)
from stas.errors import ConfigError
from stas.evaluation.base import REGISTRY, Evaluator


def evaluator_names() -> tuple[str, ...]:
    """The names eval.evaluators may hold, in registry order."""
    return tuple(REGISTRY)


def registered() -> tuple[type[Evaluator], ...]:
    """Every evaluator class, in registry order."""
    return tuple(REGISTRY.values())


def evaluator_class(name: str, path: str = "eval.evaluators") -> type[Evaluator]:
    """The class registered as `name`; a ConfigError naming `path`, the value and the allowed names otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"{path}={name!r} is not allowed; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[name]
