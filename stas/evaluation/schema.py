"""The `eval` config node: options every evaluator shares, then one node per registered evaluator that has a
config (`eval.<name>`, its class's `config` dataclass), in registry order. stas.config composes `EvalConfig` into
the root schema; `validate_eval` checks the node at start-up, each evaluator its own part (`check_config`).

The node is built from the registry when this module is imported, so an evaluator module in
stas/evaluation/evaluators/ brings its node with it: eval.pixel, eval.dino, eval.clip, eval.vbench today.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import List, Optional

from stas.errors import ConfigError
from stas.evaluation.base import Evaluator
from stas.evaluation.registry import evaluator_class, registered


@dataclass
class SharedEvalConfig:
    evaluators: List[str] = field(default_factory=list)  # registered names: pixel | dino | clip | vbench | ...
    device: str = "auto"  # where the evaluators run: auto | cpu | cuda | cuda:N
    batch_size: int = 32  # frames per forward pass of dino / clip
    temporal_compression: Optional[int] = None  # latent chunking of the chunk-aware metrics; default: the model's VAE


SHARED_BOUNDS = {"batch_size": (1, 4096), "temporal_compression": (1, 64)}


def build_eval_config(classes: tuple[type[Evaluator], ...]) -> type:
    """The dataclass of the `eval` node: SharedEvalConfig's fields, then a node per class with a `config`."""
    nodes = [(cls.name, cls.config, field(default_factory=cls.config)) for cls in classes if cls.config is not None]
    schema = make_dataclass("EvalConfig", nodes, bases=(SharedEvalConfig,))
    schema.__module__ = __name__  # pickled configs (submitit) find it here
    schema.__doc__ = "The eval node: " + ", ".join(f"eval.{name}" for name, _, _ in nodes) + " and the shared options."
    return schema


def eval_bounds(classes: tuple[type[Evaluator], ...]) -> dict[str, tuple[int, int]]:
    """{eval.path: (low, high)} of every bounded numeric field of the node."""
    bounds = {f"eval.{key}": limits for key, limits in SHARED_BOUNDS.items()}
    for cls in classes:
        bounds.update({f"eval.{cls.name}.{key}": limits for key, limits in cls.bounds.items()})
    return bounds


EvalConfig = build_eval_config(registered())
EVAL_BOUNDS = eval_bounds(registered())  # stas.config's number checks include them


def check_device(path: str, device: str) -> None:
    if not (device in ("auto", "cpu") or str(device).startswith("cuda")):
        raise ConfigError(f"{path}={device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")


def check_bounds(path: str, value, low: int, high: int) -> None:
    if value is None:
        return
    if not ((isinstance(value, int) or math.isfinite(value)) and low <= value <= high):
        kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a finite number"
        raise ConfigError(f"{path}={value!r} must be {kind} in [{low}, {high}]")


def validate_eval(evaluation) -> None:
    """Check the `eval` node: known, distinct evaluator names, the device, the numeric ranges (`bounds`), and the
    node of each selected evaluator (its check_config). Raises ConfigError naming the field, the value and what is
    allowed."""
    for name in evaluation.evaluators:
        evaluator_class(name)
    if len(set(evaluation.evaluators)) != len(evaluation.evaluators):
        raise ConfigError(f"eval.evaluators={list(evaluation.evaluators)} names an evaluator twice")
    check_device("eval.device", evaluation.device)
    for key, (low, high) in SHARED_BOUNDS.items():
        check_bounds(f"eval.{key}", evaluation[key], low, high)
    for cls in registered():
        selected = cls.name in evaluation.evaluators
        options = None
        if cls.config is not None:
            if cls.name not in evaluation:  # registered after the schema was built (not from evaluators/)
                if selected:
                    raise ConfigError(f"eval.{cls.name} is missing: evaluator {cls.name!r} ({cls.__module__}) has a "
                                      "config node, which only evaluators in stas/evaluation/evaluators/ get")
                continue
            options = evaluation[cls.name]
            for key, (low, high) in cls.bounds.items():
                check_bounds(f"eval.{cls.name}.{key}", options[key], low, high)
        if selected:
            cls.check_config(options, evaluation)
