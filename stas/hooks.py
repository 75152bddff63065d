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
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
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

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        self.layout, self.num_steps, self.do_cfg = layout, num_steps, do_cfg
        self.calls, self.step, self.call_in_step = 0, -1, 0

    def on_transformer_call(self, module, args, kwargs) -> None:
        if self.layout is None:
            raise RuntimeError("call begin(layout, num_steps, do_cfg) before running the pipeline")
        self.step, self.call_in_step = divmod(self.calls, self.backbone.calls_per_step(self.do_cfg))
        self.calls += 1

    def rows(self, branches: tuple[str, ...], batch: int) -> slice | None:
        """Rows of the current call's batch that belong to `branches` (contiguous for one branch or both)."""
        spans = [self.backbone.branch_rows(b, self.call_in_step, batch, self.do_cfg) for b in branches]
        spans = [s for s in spans if s is not None]
        if not spans:
            return None
        return slice(min(s.start for s in spans), max(s.stop for s in spans))

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


class LayerSteering:
    """The steering hook of one block: runs the rule at the steered tokens and channels, in place, on the device."""

    def __init__(self, steerer: "StasSteerer", layer: int, channels: torch.Tensor | None):
        self.steerer = steerer
        self.layer = layer
        self.channels = channels  # None: detect the massive channels on every call
        self._device_channels: dict = {}

    def __call__(self, block, args, output):
        steerer = self.steerer
        tracker = steerer.tracker
        if tracker.step not in steerer.steps:
            return None
        hidden = steerer.backbone.video_tokens(output)
        rows = tracker.rows(steerer.branches, hidden.shape[0])
        if rows is None:
            return None
        token_index = steerer.token_index(hidden)
        steered = hidden[rows]  # a view: steering it writes into the block output
        values_per_channel = steered.shape[0] * token_index.shape[0]
        if self.channels is None:
            peaks = channel_peaks(steered, dim=1)  # the one full read of the hidden states
            channels, is_massive = top_massive_channels(peaks.amax(dim=0), steerer.cfg.ratio, steerer.cfg.max_dims)
            peaks = peaks[:, channels]
            massive = is_massive.sum()  # stays on the device: record() reads the totals once
            steerer.count(massive, massive * values_per_channel)
        else:
            channels = self._on(hidden.device)
            peaks = channel_peaks(steered[:, :, channels], dim=1)  # reads only the steered channels
            is_massive = None
            steerer.count(None, channels.shape[0] * values_per_channel)
        steer_tokens_(steered, token_index, channels, is_massive, peaks, steerer.cfg)
        steerer.calls[(self.layer, tracker.step, self._branch_name(rows, hidden.shape[0]))] += 1
        return None

    def _on(self, device) -> torch.Tensor:
        if device not in self._device_channels:
            self._device_channels[device] = self.channels.to(device)
        return self._device_channels[device]

    def _branch_name(self, rows: slice, batch: int) -> str:
        names = [name for name, span in self.steerer.tracker.branches_of_call(batch)
                 if span.start >= rows.start and span.stop <= rows.stop]
        return "+".join(names)


def steer_tokens_(hidden, token_index, channels, is_massive, peaks, cfg) -> None:
    """Apply the rule in place at hidden[:, token_index, channels] (B, T, k); `peaks` (B, k) over all tokens."""
    index = (slice(None), token_index[:, None], channels[None, :])
    values = hidden[index]
    steered = is_massive if is_massive is not None else torch.ones_like(peaks[0], dtype=torch.bool)
    new = steered_values(values, reference_magnitude(peaks, steered, cfg.rule), cfg.rule, cfg.alpha, cfg.strength)
    if is_massive is not None:
        new = torch.where(is_massive, new, values)
    hidden[index] = new


class StasSteerer:
    """STAS on a transformer: which blocks, steps, branches, tokens and channels, from a `steer` config."""

    def __init__(self, backbone: Backbone, cfg, calibration: dict[int, list[int]] | None = None):
        from stas.config import steered_layers

        check_rule(cfg.rule, cfg.alpha, cfg.strength)
        self.backbone = backbone
        self.cfg = cfg
        self.layers = steered_layers(cfg.layers, backbone.num_layers)
        self.branches = CFG_BRANCHES if cfg.branches == "both" else (cfg.branches,)
        self.channels = {layer: _fixed_channels(cfg, backbone, calibration, layer) for layer in self.layers}
        self.hooks = BlockHooks(backbone)
        self.tracker = self.hooks.tracker
        self.steps: range = range(0)
        self._token_index: dict = {}
        self.calls: Counter = Counter()
        # Totals of the last pipeline call: device tensors once a detected count is added, read only by record().
        self.massive_channels_seen: torch.Tensor | int = 0
        self.values_steered: torch.Tensor | int = 0

    @contextmanager
    def attach(self, transformer):
        # A layer whose calibrated channel list is empty has nothing to steer and gets no hook.
        hooks = {
            layer: LayerSteering(self, layer, channels)
            for layer, channels in self.channels.items()
            if channels is None or len(channels)
        }
        with self.hooks.attached(transformer, hooks):
            yield self

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        from stas.config import window_steps

        self.tracker.begin(layout, num_steps, do_cfg)
        self.steps = window_steps(self.cfg.window, num_steps)
        self.calls = Counter()
        self.massive_channels_seen = self.values_steered = 0

    def count(self, massive_channels: torch.Tensor | None, values: torch.Tensor | int) -> None:
        """Add one hook call's detected MA channels (None: fixed channels) and steered values, without a sync."""
        if massive_channels is not None:
            self.massive_channels_seen = self.massive_channels_seen + massive_channels
        self.values_steered = self.values_steered + values

    def token_index(self, hidden: torch.Tensor) -> torch.Tensor:
        layout = self.tracker.layout
        self.tracker.check_tokens(hidden.shape[1])
        key = (layout, hidden.device)
        if key not in self._token_index:
            self._token_index[key] = layout.indices(
                self.cfg.targets, self.cfg.boundary_width, self.cfg.boundary_unit, device=hidden.device
            )
        return self._token_index[key]

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
