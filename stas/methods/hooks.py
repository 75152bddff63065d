"""Thin adapters between the tensor math and a diffusers transformer: plain torch forward hooks.

`DenoisingTracker` knows, for every transformer call, the denoising step and which rows of the batch are the cond
and uncond CFG branches (two-pass CFG calls the transformer twice a step, batched CFG once on [uncond, cond]). The
loop that makes the call tells it (stas.loop announces a `DenoisingCall` per call, whatever extra passes its guider
makes); under a pipeline's own loop (`pipe(...)`, users' scripts) it counts calls. Either way on the host, so it
never reads a tensor. Block hooks read the tracker, never the other way round.
Every method (stas.methods.stas) and the analysis capture (stas.ma.capture) hook the blocks through `BlockHooks`.

torch.compile (model.compile=regional|full): the block hooks are traced into the compiled graphs, so nothing they
read may change from call to call on the host. Everything that does (is this call's step in the window, which CFG
branch it is) is decided by the transformer's pre-hook, which always runs eagerly (regional compilation compiles
the blocks, full compilation the transformer's `forward`, never its hooks), and handed to the block hooks as small
device tensors updated in place (stas.methods.call_state.CallState). The config is read once into plain Python values
(stas.methods.steering_hook.SteerParams). In eager mode a hook outside the window still returns after a Python check;
traced, it always computes and the per-call gate selects (`torch.where`), so one graph serves every step and branch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from stas.backbones import CFG_BRANCHES, Backbone
from stas.backbones.parallel import token_split
from stas.core.layout import TokenLayout
from stas.core.parallel import WHOLE, TokenSplit


@dataclass(frozen=True)
class DenoisingCall:
    """What a denoising loop tells the hooks about one transformer call: its step, which call of the step it is, every
    call of the step (each the branches of its batch's rows in row order, in equal chunks) and the expert called."""

    step: int
    call: int
    calls: tuple[tuple[str, ...], ...]
    expert: str = "transformer"

    @property
    def branches(self) -> tuple[str, ...]:
        return self.calls[self.call]


ANNOUNCED = "_stas_denoising_call"  # the transformer's attribute holding the call a loop announced


@contextmanager
def announced(transformer: torch.nn.Module, call: DenoisingCall):
    """Tell the trackers hooked to `transformer` what its calls inside this block are (stas.loop enters it around
    every call), instead of their counting calls."""
    setattr(transformer, ANNOUNCED, call)
    try:
        yield
    finally:
        delattr(transformer, ANNOUNCED)


def rows_of(branch: str, branches: tuple[str, ...], batch: int) -> slice | None:
    """Rows of `branch` in a call whose batch holds `branches` in equal chunks, or None when it is not there."""
    if branch not in branches:
        return None
    if batch % len(branches):
        raise RuntimeError(f"a transformer call of {batch} rows cannot hold the branches {branches} in equal chunks")
    size = batch // len(branches)
    start = branches.index(branch) * size
    return slice(start, start + size)


class DenoisingTracker:
    """The current transformer call's step, CFG branches and expert: announced by the loop that makes the call
    (stas.loop, `announced`), or, for a pipeline's own loop (`pipe(...)`), counted: `begin` before every pipeline
    call."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.layout: TokenLayout | None = None
        self.num_steps = 0
        self.do_cfg = True
        self.calls = 0
        self.step = -1
        self.call_in_step = 0
        self.step_calls: tuple[tuple[str, ...], ...] = ()  # every call of the current step: its rows' branches
        self.expert = "transformer"
        self.latents: torch.Tensor | None = None  # the call's input while the listeners run (its batch, device)
        self.split: TokenSplit = WHOLE  # the tokens this rank's blocks see (context parallelism: its chunk)
        # Called once each call is known, no arguments: they prepare the hooks' per-call state, outside any graph.
        self.listeners: list[Callable[[], None]] = []

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        self.layout, self.num_steps, self.do_cfg = layout, num_steps, do_cfg
        self.calls, self.step, self.call_in_step = 0, -1, 0
        self.step_calls = self.backbone.pipeline_cfg_calls(do_cfg)

    def set_cfg(self, do_cfg: bool) -> None:
        """Whether the pipeline call in progress runs CFG, learnt after its first transformer call (a two-pass
        pipeline that records nothing that tells: stas.apply_stas on HunyuanVideo); that call is cond either way."""
        self.do_cfg = do_cfg

    def counted_call(self, expert: str = "transformer") -> DenoisingCall:
        """The call a family's own pipeline makes as call number `self.calls` of the run, on `expert`: the calls of
        every expert count on, so the step index goes on across a switch of experts (Wan2.2-A14B)."""
        calls = self.backbone.pipeline_cfg_calls(self.do_cfg)
        return DenoisingCall(*divmod(self.calls, len(calls)), calls, expert)

    def on_transformer_call(self, module, args, kwargs, expert: str = "transformer") -> None:
        """The pre-hook of every expert (`expert`: its name, for a pipeline's own loop that announces nothing)."""
        if self.layout is None:
            raise RuntimeError("call begin(layout, num_steps, do_cfg) before running the pipeline")
        call = getattr(module, ANNOUNCED, None) or self.counted_call(expert)
        self.step, self.call_in_step, self.step_calls, self.expert = call.step, call.call, call.calls, call.expert
        self.calls += 1
        self.split = token_split(self.backbone, module)
        latents = kwargs.get("hidden_states", args[0] if args else None)
        self.latents = latents if isinstance(latents, torch.Tensor) else None
        try:
            for listener in self.listeners:
                listener()
        finally:
            self.latents = None

    def call_latents(self) -> torch.Tensor:
        """The current transformer call's latents (hidden_states): its batch size and device."""
        if self.latents is None:
            raise RuntimeError("the transformer was called without a hidden_states tensor: the hooks cannot tell "
                               "the batch and device of the call")
        return self.latents

    def rows(self, branches: tuple[str, ...], batch: int, call_in_step: int | None = None) -> slice | None:
        """Rows of the current call's batch (or of call `call_in_step` of the step) that belong to `branches`
        (contiguous for one branch or both)."""
        call = self.step_calls[self.call_in_step if call_in_step is None else call_in_step]
        spans = [rows for b in branches if (rows := rows_of(b, call, batch)) is not None]
        if not spans:
            return None
        return slice(min(s.start for s in spans), max(s.stop for s in spans))

    def steered_rows(self, branches: tuple[str, ...], batch: int) -> slice | None:
        """The rows `branches` occupy in every call of a step that has them: the same in all such calls (two-pass
        CFG: the whole batch of the branch's call; batched CFG: a fixed half), so a traced hook can slice them
        statically and leave the calls without them to the per-call gate. None: no call has them."""
        # Each call holds as many rows per branch as this one (a guider's perturbed pass is a smaller call).
        per_branch = batch // len(self.step_calls[self.call_in_step])
        found = {(rows.start, rows.stop) for call, held in enumerate(self.step_calls)
                 if (rows := self.rows(branches, per_branch * len(held), call)) is not None}
        if len(found) > 1:  # no family does this: a hook would need per-call rows
            raise RuntimeError(f"branches {branches} occupy different rows in different calls of a step: {found}")
        return slice(*found.pop()) if found else None

    def local_tokens(self) -> int:
        """The video tokens a block output of the current call holds: the layout's, or this rank's chunk of them."""
        return self.split.local_tokens(self.layout.num_tokens)

    def check_tokens(self, num_tokens: int) -> None:
        """Fail when a block output's video tokens do not match the layout given to begin()."""
        if num_tokens != self.local_tokens():
            split = self.split
            chunk = f" (rank {split.rank} of {split.world}: {self.local_tokens()})" if split.parallel else ""
            raise RuntimeError(
                f"block output has {num_tokens} video tokens but the layout {self.layout} has "
                f"{self.layout.num_tokens}{chunk}: begin() was given another video size than the pipeline call"
            )

    def branches_of_call(self, batch: int) -> list[tuple[str, slice]]:
        """Every CFG branch present in the current call, with its rows (other passes a guider adds are none)."""
        call = self.step_calls[self.call_in_step]
        return [(b, rows) for b in CFG_BRANCHES if (rows := rows_of(b, call, batch)) is not None]


def expert_modules(transformer) -> dict[str, torch.nn.Module]:
    """{expert name: transformer} of what a method attaches to: one transformer (named "transformer"), or the
    experts of a pipeline (`Backbone.experts`, e.g. Wan2.2-A14B's transformer and transformer_2)."""
    return dict(transformer) if isinstance(transformer, dict) else {"transformer": transformer}


class BlockHooks:
    """Attaches one tracker to every expert transformer and per-block output hooks; removes them all on close.
    One tracker for all experts: the step index goes on across a switch of experts."""

    def __init__(self, backbone: Backbone, tracker: DenoisingTracker | None = None):
        self.backbone = backbone
        self.tracker = tracker or DenoisingTracker(backbone)
        self._handles: list = []

    def attach(self, transformer, block_hooks: dict) -> "BlockHooks":
        """`transformer`: a transformer or {expert name: transformer}; `block_hooks`: {block index: hook} for every
        expert, or {expert name: {block index: hook}}."""
        for name, module in expert_modules(transformer).items():
            def pre_hook(module, args, kwargs, name=name):
                self.tracker.on_transformer_call(module, args, kwargs, expert=name)

            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            hooks = block_hooks.get(name, {}) if any(isinstance(key, str) for key in block_hooks) else block_hooks
            blocks = self.backbone.blocks(module)
            for index, hook in hooks.items():
                self._handles.append(blocks[index].register_forward_hook(hook))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def attached(self, transformer, block_hooks: dict):
        """attach() for the duration of a `with` block."""
        self.attach(transformer, block_hooks)
        try:
            yield self
        finally:
            self.remove()


def persistent_tensor(*args, **kwargs) -> torch.Tensor:
    """torch.zeros(...) that is never an inference tensor, so that it may be updated in place in and outside
    torch.inference_mode() alike, and compiled graphs always see the same kind of input."""
    with torch.inference_mode(False):
        return torch.zeros(*args, **kwargs)
