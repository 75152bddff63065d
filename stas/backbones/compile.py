"""torch.compile for a diffusers transformer with stas's hooks on it (model.compile), and compile counters."""

from __future__ import annotations

import torch

from stas.backbones.base import BackboneError

COMPILE_MODES = ("none", "regional", "full")


def compile_transformer(transformer: torch.nn.Module, mode: str, **options) -> None:
    """torch.compile a diffusers transformer in place: `mode` none, regional or full (model.compile).

    regional: diffusers' `compile_repeated_blocks` (the transformer blocks, one graph shared by all of them: the
    recommended mode, compiling in seconds rather than minutes). full: the transformer's `forward`, blocks included.
    Both leave the transformer's own forward pre-hooks eager, on purpose: stas's hooks (stas.methods, stas.ma.capture,
    the tiny twins' planter) count the denoising calls and write their per-call device state there, outside the
    graph; `transformer.compile()` would compile `_call_impl`, those pre-hooks with it, and a host counter inside a
    graph recompiles at every call. The block hooks are traced into the graphs (they read nothing that changes
    from call to call on the host). `options` go to torch.compile."""
    if mode not in COMPILE_MODES:
        raise BackboneError(f"model.compile={mode!r} is not allowed; allowed: {', '.join(COMPILE_MODES)}")
    if mode == "regional":
        if not getattr(transformer, "_repeated_blocks", None):
            import diffusers

            raise BackboneError(
                f"model.compile=regional needs diffusers' regional compilation, and {type(transformer).__name__} "
                f"declares no `_repeated_blocks` in diffusers {diffusers.__version__}: use model.compile=full"
            )
        transformer.compile_repeated_blocks(**options)
    elif mode == "full":
        transformer.forward = torch.compile(transformer.forward, **options)


def reset_compiler() -> None:
    """torch._dynamo.reset() and dynamo's counters, which reset() keeps: compile_counts() then starts from zero, as
    in a fresh process (tests use this between cases)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def compile_counts() -> dict:
    """torch.compile's totals in this process so far (since the last reset_compiler()): graphs compiled,
    recompiles (compiles of a frame after its first: a guard failed, e.g. a host value read in traced code changed)
    and graph breaks. Compare two readings to see what a run added; on any device."""
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters

    per_frame = getattr(convert_frame, "FRAME_COMPILE_COUNTER", {})  # compiles per frame (dynamo internals)
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "recompiles": sum(max(0, count - 1) for count in per_frame.values()),
        "graph_breaks": sum(counters["graph_break"].values()),
    }
