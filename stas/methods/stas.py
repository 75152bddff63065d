"""STAS (Structured Activation Steering) on a diffusers transformer: one forward hook per steered block.

Usage (what stas.generation does for each video):

    with StasSteerer(backbone, steer_cfg).attach(pipe.transformer) as steerer:
        steerer.begin(layout, num_steps=50, do_cfg=True)
        pipe(...)
        steerer.record()          # what was steered

After the `with` block the hooks are gone and the transformer computes exactly what it computed before.
The rule itself is pure tensor math in stas.core.rules; this module decides where and when it runs.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from stas.backbones import CFG_BRANCHES, Backbone
from stas.core.layout import TokenLayout
from stas.core.massive import channel_peaks, load_calibration, top_massive_channels
from stas.core.rules import check_rule, reference_magnitude, steered_values
from stas.core.selection import steered_layers, window_steps
from stas.errors import ConfigError
from stas.methods.base import Method, register_method
from stas.methods.hooks import BlockHooks


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


@register_method("stas")
class StasSteerer(Method):
    """STAS on a transformer: which blocks, steps, branches, tokens and channels, from a `steer` config."""

    def __init__(self, backbone: Backbone, cfg, calibration: dict[int, list[int]] | None = None):
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


def steering_calibration(steer, model) -> dict[int, list[int]] | None:
    """The per-layer channels a calibrated `steer.dims` steers, read from steer.calibration and checked against the
    model (blocks, channel range, types); None for the other dims."""
    dims = steer.dims
    if not (isinstance(dims, str) and dims.startswith("calibrated")):
        return None
    if not steer.calibration:
        raise ConfigError(f"steer.dims={dims} needs steer.calibration=<path to ma_dims.yaml> (written by stas.analyze)")
    if not Path(steer.calibration).is_file():
        raise ConfigError(f"steer.calibration={steer.calibration!r}: no such file (run stas.analyze first)")
    try:
        return load_calibration(steer.calibration, dims, model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"steer.calibration={steer.calibration!r}: {err}") from None


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
