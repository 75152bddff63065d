"""Thin adapters between the tensor math and a diffusers transformer: plain torch forward hooks.

`DenoisingTracker` knows, for every transformer call, the denoising step and which rows of the batch are the cond
and uncond CFG branches (two-pass CFG calls the transformer twice a step, batched CFG once on [uncond, cond]). It
counts calls on the host, so it never reads a tensor. Block hooks read the tracker, never the other way round.

Usage (what stas.generation does for each video):

    with StasSteerer(backbone, steer_cfg).attach(pipe.transformer) as steerer:
        steerer.begin(layout, num_steps=50, do_cfg=True)
        pipe(...)
        steerer.record()          # what was steered

After the `with` block the hooks are gone and the transformer computes exactly what it computed before.

torch.compile (model.compile=regional|full): the block hooks are traced into the compiled graphs, so nothing they
read may change from call to call on the host. Everything that does (is this call's step in the window, which CFG
branch it is) is decided by the transformer's pre-hook, which always runs eagerly (regional compilation compiles
the blocks, full compilation the transformer's `forward`, never its hooks), and handed to the block hooks as small
device tensors updated in place (`CallState`). The config is read once into plain Python values (`SteerParams`).
In eager mode a hook outside the window still returns after a Python check; traced, it always computes and the
per-call gate selects (`torch.where`), so one graph serves every step and branch.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from stas.backbones import CFG_BRANCHES, Backbone
from stas.layout import TokenLayout
from stas.massive import channel_peaks, top_massive_channels
from stas.steering import check_rule, reference_magnitude, steered_values


class DenoisingTracker:
    """Counts transformer calls to know the current step and CFG call; `begin` before every pipeline call."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.layout: TokenLayout | None = None
        self.num_steps = 0
        self.do_cfg = True
        self.calls = 0
        self.step = -1
        self.call_in_step = 0
        self.latents: torch.Tensor | None = None  # the call's input while the listeners run (its batch, device)
        # Called after every count with no arguments: they prepare the hooks' per-call state, outside any graph.
        self.listeners: list[Callable[[], None]] = []

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        self.layout, self.num_steps, self.do_cfg = layout, num_steps, do_cfg
        self.calls, self.step, self.call_in_step = 0, -1, 0

    def on_transformer_call(self, module, args, kwargs) -> None:
        if self.layout is None:
            raise RuntimeError("call begin(layout, num_steps, do_cfg) before running the pipeline")
        self.step, self.call_in_step = divmod(self.calls, self.backbone.calls_per_step(self.do_cfg))
        self.calls += 1
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
        """Rows of the current call's batch (or of call `call_in_step` of a step) that belong to `branches`
        (contiguous for one branch or both)."""
        call = self.call_in_step if call_in_step is None else call_in_step
        spans = [self.backbone.branch_rows(b, call, batch, self.do_cfg) for b in branches]
        spans = [s for s in spans if s is not None]
        if not spans:
            return None
        return slice(min(s.start for s in spans), max(s.stop for s in spans))

    def steered_rows(self, branches: tuple[str, ...], batch: int) -> slice | None:
        """The rows `branches` occupy in every call of a step that has them: the same in all such calls (two-pass
        CFG: the whole batch of the branch's call; batched CFG: a fixed half), so a traced hook can slice them
        statically and leave the calls without them to the per-call gate. None: no call has them."""
        found = {(rows.start, rows.stop) for call in range(self.backbone.calls_per_step(self.do_cfg))
                 if (rows := self.rows(branches, batch, call)) is not None}
        if len(found) > 1:  # no family does this: a hook would need per-call rows
            raise RuntimeError(f"branches {branches} occupy different rows in different calls of a step: {found}")
        return slice(*found.pop()) if found else None

    def check_tokens(self, num_tokens: int) -> None:
        """Fail when a block output's video tokens do not match the layout given to begin()."""
        if num_tokens != self.layout.num_tokens:
            raise RuntimeError(
                f"block output has {num_tokens} video tokens but the layout {self.layout} has "
                f"{self.layout.num_tokens}: begin() was given another video size than the pipeline call"
            )

    def branches_of_call(self, batch: int) -> list[tuple[str, slice]]:
        """Every CFG branch present in the current call, with its rows."""
        found = [(b, self.backbone.branch_rows(b, self.call_in_step, batch, self.do_cfg)) for b in CFG_BRANCHES]
        return [(b, rows) for b, rows in found if rows is not None]


class BlockHooks:
    """Attaches one tracker to a transformer and per-block output hooks; removes them all on close."""

    def __init__(self, backbone: Backbone, tracker: DenoisingTracker | None = None):
        self.backbone = backbone
        self.tracker = tracker or DenoisingTracker(backbone)
        self._handles: list = []

    def attach(self, transformer: torch.nn.Module, block_hooks: dict[int, Callable]) -> "BlockHooks":
        self._handles.append(transformer.register_forward_pre_hook(self.tracker.on_transformer_call, with_kwargs=True))
        blocks = self.backbone.blocks(transformer)
        for index, hook in block_hooks.items():
            self._handles.append(blocks[index].register_forward_hook(hook))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def attached(self, transformer: torch.nn.Module, block_hooks: dict[int, Callable]):
        """attach() for the duration of a `with` block."""
        self.attach(transformer, block_hooks)
        try:
            yield self
        finally:
            self.remove()


@dataclass(frozen=True)
class SteerParams:
    """What the steering hooks read of a `steer` config, as plain Python values read once (a hook never reads an
    OmegaConf node: in a compiled region that would break the graph)."""

    rule: str
    alpha: float
    strength: float
    ratio: float
    max_dims: int
    targets: str
    boundary_width: int
    boundary_unit: str

    @classmethod
    def of(cls, cfg) -> "SteerParams":
        return cls(str(cfg.rule), float(cfg.alpha), float(cfg.strength), float(cfg.ratio), int(cfg.max_dims),
                   str(cfg.targets), int(cfg.boundary_width), str(cfg.boundary_unit))


def persistent_tensor(*args, **kwargs) -> torch.Tensor:
    """torch.zeros(...) that is never an inference tensor, so that it may be updated in place in and outside
    torch.inference_mode() alike, and compiled graphs always see the same kind of input."""
    with torch.inference_mode(False):
        return torch.zeros(*args, **kwargs)


class CallState:
    """The steering hooks' per-call state on the device, written by the transformer pre-hook (eager) only.

    `gate` (0-d bool): this call steers (its step is in the window and it has a steered branch). `rows`: the batch
    rows of the steered branches (the same in every call that has them), `token_index` the steered tokens, the
    counters the detected MA channels and steered values. `active` mirrors `gate` on the host for eager hooks."""

    def __init__(self, key: tuple, rows: slice | None, token_index: torch.Tensor):
        self.key = key  # (device, batch, tokens, CFG): what the state was made for
        device, _, self.num_tokens, _ = key
        self.rows, self.token_index = rows, token_index
        self.gate = persistent_tensor((), dtype=torch.bool, device=device)
        self.massive_seen = persistent_tensor((), dtype=torch.long, device=device)
        self.values_steered = persistent_tensor((), dtype=torch.long, device=device)
        self.active = False

    def set(self, active: bool) -> None:
        if active != self.active:
            self.gate.fill_(active)  # a kernel launch with a host scalar: no synchronisation
            self.active = active

    def reset_counts(self) -> None:
        self.massive_seen.zero_()
        self.values_steered.zero_()


class LayerSteering:
    """The steering hook of one block: runs the rule at the steered tokens and channels, in place, on the device."""

    def __init__(self, steerer: "StasSteerer", layer: int, channels: torch.Tensor | None):
        self.steerer = steerer
        self.layer = layer
        self.channels = channels  # None: detect the massive channels on every call
        self.device_channels = channels  # `channels` on the device of the calls, placed by the pre-hook

    def __call__(self, block, args, output):
        steerer = self.steerer
        state = steerer.state
        # Eager: outside the window or for an unsteered branch, a host check and nothing else. Traced: the same
        # graph for every call, the gate selects (no host value that changes between calls is read here).
        if not torch.compiler.is_compiling() and (state is None or not state.active):
            return None
        if state.rows is None:  # no call of this run has a steered branch (e.g. uncond without CFG)
            return None
        gate = state.gate if torch.compiler.is_compiling() else None  # eager hooks run in steered calls only
        hidden = steerer.backbone.video_tokens(output)
        if hidden.shape[1] != state.num_tokens:
            steerer.tracker.check_tokens(hidden.shape[1])
        params = steerer.params
        token_index = state.token_index
        steered = hidden[state.rows]  # a view: steering it writes into the block output
        values_per_channel = steered.shape[0] * token_index.shape[0]
        if self.channels is None:
            peaks = channel_peaks(steered, dim=1)  # the one full read of the hidden states
            channels, is_massive = top_massive_channels(peaks.amax(dim=0), params.ratio, params.max_dims)
            peaks = peaks[:, channels]
            massive = is_massive.sum()  # stays on the device: record() reads the totals once
            if gate is not None:
                massive = massive * gate
            state.massive_seen.add_(massive)
            state.values_steered.add_(massive * values_per_channel)
        else:
            channels = self.device_channels
            if channels.device != hidden.device:  # eager only: the pre-hook places them for compiled runs
                channels = self.device_channels = self.channels.to(hidden.device)
            peaks = channel_peaks(steered[:, :, channels], dim=1)  # reads only the steered channels
            is_massive = None  # the steered values of fixed channels are counted on the host by the pre-hook
        steer_tokens_(steered, token_index, channels, is_massive, peaks, params, gate=gate)
        return None


def steer_tokens_(hidden, token_index, channels, is_massive, peaks, cfg, gate=None) -> None:
    """Apply the rule in place at hidden[:, token_index, channels] (B, T, k); `peaks` (B, k) over all tokens.
    `cfg` has rule, alpha and strength; with a 0-d bool `gate`, nothing changes where it is False."""
    index = (slice(None), token_index[:, None], channels[None, :])
    values = hidden[index]
    steered = is_massive if is_massive is not None else torch.ones_like(peaks[0], dtype=torch.bool)
    new = steered_values(values, reference_magnitude(peaks, steered, cfg.rule), cfg.rule, cfg.alpha, cfg.strength)
    if is_massive is not None:
        steered = is_massive if gate is None else is_massive & gate
        new = torch.where(steered, new, values)
    elif gate is not None:
        new = torch.where(gate, new, values)
    hidden[index] = new


class StasSteerer:
    """STAS on a transformer: which blocks, steps, branches, tokens and channels, from a `steer` config."""

    def __init__(self, backbone: Backbone, cfg, calibration: dict[int, list[int]] | None = None):
        from stas.config import steered_layers

        check_rule(cfg.rule, cfg.alpha, cfg.strength)
        self.backbone = backbone
        self.cfg = cfg
        self.params = SteerParams.of(cfg)
        self.layers = steered_layers(cfg.layers, backbone.num_layers)
        self.branches = CFG_BRANCHES if cfg.branches == "both" else (cfg.branches,)
        self.channels = {layer: _fixed_channels(cfg, backbone, calibration, layer) for layer in self.layers}
        # A layer whose calibrated channel list is empty has nothing to steer and gets no hook.
        self.hooked_layers = [layer for layer, channels in self.channels.items() if channels is None or len(channels)]
        self.hooks = BlockHooks(backbone)
        self.tracker = self.hooks.tracker
        self.tracker.listeners.append(self._on_call)
        self.steps: range = range(0)
        self._token_index: dict = {}
        self.calls: Counter = Counter()
        self.state: CallState | None = None  # per-call device state, (re)made by the pre-hook for each device
        self._hooked: dict[int, LayerSteering] = {}
        self._placed = False  # the attached hooks' channels are on the state's device
        self._device_channels: dict = {}  # (layer, device) -> fixed channels there, copied once
        self._fixed_values = 0  # values steered at fixed channels, counted on the host

    @contextmanager
    def attach(self, transformer):
        self._hooked = {layer: LayerSteering(self, layer, self.channels[layer]) for layer in self.hooked_layers}
        self._placed = False
        try:
            with self.hooks.attached(transformer, self._hooked):
                yield self
        finally:
            self._hooked = {}

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        from stas.config import window_steps

        self.tracker.begin(layout, num_steps, do_cfg)
        self.steps = window_steps(self.cfg.window, num_steps)
        self.calls = Counter()
        self._fixed_values = 0
        if self.state is not None:
            self.state.reset_counts()

    def _on_call(self) -> None:
        """The transformer pre-hook's part (eager, outside any compiled region): this call's state, on its device,
        and the host-side accounting of what the block hooks will steer."""
        tracker = self.tracker
        latents = tracker.call_latents()
        batch, device = latents.shape[0], latents.device
        state = self.state
        if state is None or state.key != (device, batch, tracker.layout.num_tokens, tracker.do_cfg):
            state = self.state = self._new_state(device, batch)
            self._placed = False
        if not self._placed:  # fixed channels on the device, before any (compiled) hook reads them
            for layer, hook in self._hooked.items():
                if hook.channels is not None:
                    if (layer, device) not in self._device_channels:
                        self._device_channels[(layer, device)] = hook.channels.to(device)
                    hook.device_channels = self._device_channels[(layer, device)]
            self._placed = True
        rows = tracker.rows(self.branches, batch)
        active = tracker.step in self.steps and rows is not None
        state.set(active)
        if not active:
            return
        branch = self._branch_name(rows, batch)
        values_per_channel = (rows.stop - rows.start) * state.token_index.shape[0]
        for layer in self.hooked_layers:  # every hooked block runs once per transformer call
            self.calls[(layer, tracker.step, branch)] += 1
            if self.channels[layer] is not None:
                self._fixed_values += self.channels[layer].shape[0] * values_per_channel

    def _new_state(self, device: torch.device, batch: int) -> CallState:
        previous = self.state
        tracker = self.tracker
        state = CallState((device, batch, tracker.layout.num_tokens, tracker.do_cfg),
                          tracker.steered_rows(self.branches, batch), self.token_index_on(device))
        if previous is not None:  # a new device or batch within a run: carry the totals over
            state.massive_seen.add_(previous.massive_seen.to(device))
            state.values_steered.add_(previous.values_steered.to(device))
        return state

    def token_index_on(self, device) -> torch.Tensor:
        """The steered tokens' indices for the current layout, on `device` (built once per layout and device)."""
        layout = self.tracker.layout
        key = (layout, torch.device(device))
        if key not in self._token_index:
            self._token_index[key] = layout.indices(
                self.params.targets, self.params.boundary_width, self.params.boundary_unit, device=device
            )
        return self._token_index[key]

    def _branch_name(self, rows: slice, batch: int) -> str:
        names = [name for name, span in self.tracker.branches_of_call(batch)
                 if span.start >= rows.start and span.stop <= rows.stop]
        return "+".join(names)

    @property
    def massive_channels_seen(self) -> torch.Tensor | int:
        """MA channels detected over the last pipeline call's hook calls (a device tensor: read by record())."""
        return 0 if self.state is None else self.state.massive_seen

    @property
    def values_steered(self) -> torch.Tensor | int:
        """(batch row, token, channel) entries steered in the last pipeline call: detected channels on the device,
        fixed channels on the host."""
        if self.state is None or self.cfg.dims != "auto":
            return self._fixed_values
        return self.state.values_steered + self._fixed_values

    def record(self) -> dict:
        """What was steered in the last pipeline call (reads the device counters: call it after the call)."""
        layout = self.tracker.layout
        steered_tokens = int(layout.mask(self.cfg.targets, self.cfg.boundary_width, self.cfg.boundary_unit).sum())
        hook_calls = sum(self.calls.values())
        record = {
            "layers": sorted({layer for layer, _, _ in self.calls}),
            "steps": sorted({step for _, step, _ in self.calls}),
            "branches": sorted({branch for _, _, branch in self.calls}),
            "hook_calls": hook_calls,
            "tokens": steered_tokens,
            "tokens_total": layout.num_tokens,
            "dims": self.cfg.dims if isinstance(self.cfg.dims, str) else "list",
            "values_steered": int(self.values_steered),  # (batch row, token, channel) entries the rule was applied to
        }
        if self.cfg.dims == "auto":
            record["channels_mean"] = int(self.massive_channels_seen) / hook_calls if hook_calls else 0.0
            record["channels_max"] = self.cfg.max_dims
        else:
            record["channels"] = {layer: self.channels[layer].tolist() for layer in self.layers}
        return record


def _fixed_channels(cfg, backbone: Backbone, calibration, layer: int) -> torch.Tensor | None:
    """The channels a layer steers when they are known before sampling; None for per-call detection."""
    dims = cfg.dims
    if dims == "auto":
        return None
    if dims == "all":
        return torch.arange(backbone.hidden_dim)
    if isinstance(dims, str):  # calibrated*: per-layer lists from stas.analyze's ma_dims.yaml
        return torch.tensor(calibration.get(layer, []), dtype=torch.long)
    return torch.tensor(list(dims), dtype=torch.long)
