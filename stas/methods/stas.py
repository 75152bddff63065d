"""STAS (Structured Activation Steering) on a diffusers transformer: one forward hook per steered block.

Usage (what stas.generation does for each video):

    with StasSteerer(backbone, steer_cfg).attach(pipe.transformer) as steerer:
        steerer.begin(layout, num_steps=50, do_cfg=True)
        pipe(...)
        steerer.record()          # what was steered

After the `with` block the hooks are gone and the transformer computes exactly what it computed before.
The rule itself is pure tensor math in stas.core.rules; this module decides where and when it runs. Under
torch.compile the per-call decisions reach the traced hooks as device tensors (`CallState`), and the config as plain
values (`SteerParams`): see stas.methods.hooks.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from stas.backbones import CFG_BRANCHES, Backbone
from stas.core.layout import TokenLayout
from stas.core.massive import channel_peaks, load_calibration, top_massive_channels
from stas.core.rules import check_rule, reference_magnitude, steered_values
from stas.core.selection import steered_layers, window_steps
from stas.errors import ConfigError
from stas.methods.base import Method, register_method
from stas.methods.hooks import BlockHooks, persistent_tensor


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


@register_method("stas")
class StasSteerer(Method):
    """STAS on a transformer: which blocks, steps, branches, tokens and channels, from a `steer` config."""

    def __init__(self, backbone: Backbone, cfg, calibration: dict[int, list[int]] | None = None):
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
