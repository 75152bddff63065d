"""The interface every training-free method implements, and the registry of methods by name.

A method acts on a diffusers transformer through hooks while the pipeline samples, the way diffusers' hooks do:

    method = METHODS[name](backbone, cfg, ...)
    with method.attach(pipe.transformer):           # hooks on; removed when the block ends
        method.begin(layout, num_steps, do_cfg)     # before every pipeline call
        pipe(...)
        row["steering"] = method.record()           # what it did in that call (may read device counters)

STAS (stas.methods.stas) is one; the guidance baselines of the field implement the same three calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import ClassVar

import torch

from stas.core.layout import TokenLayout
from stas.registry import registrar

# method name -> Method subclass, filled by @register_method in the method modules.
METHODS: dict[str, type["Method"]] = {}


# Class decorator: `@register_method("stas")` makes a Method subclass available as "stas".
register_method = registrar(METHODS, "method", "method_name")


class Method(ABC):
    """A training-free method applied through hooks during sampling (see the module docstring)."""

    method_name: ClassVar[str]
    # Why the method cannot run context-parallel (model.parallel: each rank's blocks see a chunk of the tokens);
    # None: it can.
    not_context_parallel: ClassVar[str | None] = None

    @abstractmethod
    def attach(self, transformer: torch.nn.Module) -> AbstractContextManager:
        """Register the method's hooks on `transformer` for the duration of a `with` block."""

    @abstractmethod
    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        """Reset per-call state before a pipeline call of `num_steps` steps on a video of `layout`."""

    @abstractmethod
    def record(self) -> dict:
        """What the method did in the last pipeline call (JSON-ready)."""
