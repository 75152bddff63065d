"""STAS (Structured Activation Steering) on a diffusers transformer: one forward hook per steered block.

Usage (what stas.generation does for each video):

    with StasSteerer(backbone, steer_cfg).attach(backbone.experts(pipe)) as steerer:   # or pipe.transformer
        steerer.begin(layout, num_steps=50, do_cfg=True)
        pipe(...)
        steerer.record()          # what was steered

After the `with` block the hooks are gone and the transformer computes exactly what it computed before.
The rule itself is pure tensor math in stas.core.rules; this module decides where and when it runs. Under
torch.compile the per-call decisions reach the traced hooks as device tensors (`CallState`), and the config as plain
values (`SteerParams`): see stas.methods.hooks. Context-parallel (model.parallel), each rank's hooks steer the
first-frame and boundary tokens of the whole grid that lie in its chunk, with the whole sequence's channel peaks (one
all-reduce MAX per steered block call; stas.core.parallel), so that every rank steers what one process steers.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from stas.backbones import CFG_BRANCHES, Backbone
from stas.core.layout import TokenLayout
from stas.core.massive import load_calibration
from stas.core.parallel import WHOLE, TokenSplit
from stas.core.rules import check_rule
from stas.core.selection import steered_layers, window_steps
from stas.errors import ConfigError
from stas.methods.base import Method, register_method
from stas.methods.call_state import CallState
from stas.methods.hooks import BlockHooks, expert_modules, persistent_tensor
from stas.methods.steering_hook import LayerSteering, SteerParams


@register_method("stas")
class StasSteerer(Method):
    """STAS on a transformer: which blocks, steps, branches, tokens and channels, from a `steer` config."""

    def __init__(self, backbone: Backbone, cfg, calibration: dict | None = None, detect=None):
        """`cfg`: a `steer` config; `detect`: a `detect` config (None: stas.core.massive.Detection's defaults,
        per-branch channels); `calibration`: {block: channels} of a calibrated `steer.dims`, or {expert name:
        {block: channels}} with an expert's own channels (stas.core.massive.load_calibration)."""
        check_rule(cfg.rule, cfg.alpha, cfg.strength)
        self.backbone = backbone
        self.cfg = cfg
        self.params = SteerParams.of(cfg, detect)
        self.compile_hook = bool(getattr(cfg, "compile_hook", False))  # compiled_steering
        self.layers = steered_layers(cfg.layers, backbone.num_layers)
        self.branches = CFG_BRANCHES if cfg.branches == "both" else (cfg.branches,)
        by_expert = calibration_by_expert(calibration)
        # {expert: {layer: channels}}; "*" for every expert without its own calibration
        self.expert_channels = {expert: {layer: _fixed_channels(cfg, backbone, layers, layer) for layer in self.layers}
                                for expert, layers in by_expert.items()}
        self.channels = self.expert_channels.get("*") or next(iter(self.expert_channels.values()))
        self.hooked_layers = self.layers_of("*")  # a calibrated block without channels gets no hook
        self.step_experts: dict[int, str] = {}  # the expert of every steered step of the last pipeline call
        self.expert_names: list[str] = ["transformer"]  # of the transformers attached to
        self.hooks = BlockHooks(backbone)
        self.tracker = self.hooks.tracker
        self.tracker.listeners.append(self._on_call)
        self.steps: range = range(0)
        self._token_index: dict = {}
        self.calls: Counter = Counter()
        self.state: CallState | None = None  # per-call device state, (re)made by the pre-hook for each device
        self._hooked: dict[tuple[str, int], LayerSteering] = {}
        self._placed = False  # the attached hooks' channels are on the state's device
        self._device_channels: dict = {}  # (expert, layer, device) -> the block tensors there (_block_tensors)
        self._fixed_values = 0  # values steered at fixed channels, counted on the host
        self._detected_rows = 0  # batch rows the hooks detected channels for (massive_seen counts per row)

    def channels_of(self, expert: str) -> dict[int, torch.Tensor | None]:  # None: detected per call
        return self.expert_channels.get(expert, self.channels)

    def layers_of(self, expert: str) -> list[int]:  # the blocks that steer something (a calibrated list may be empty)
        return [layer for layer, channels in self.channels_of(expert).items() if channels is None or len(channels)]

    @contextmanager
    def attach(self, transformer):
        """`transformer`: one transformer, or {expert name: transformer} (`Backbone.experts(pipe)`): every expert's
        blocks are steered, each with its own calibrated channels when the calibration has them."""
        experts = expert_modules(transformer)
        self.expert_names = list(experts)
        self._hooked = {(name, layer): LayerSteering(self, layer, self.channels_of(name)[layer])
                        for name in experts for layer in self.layers_of(name)}
        self._placed = False
        try:
            with self.hooks.attached(experts, {name: {layer: hook for (owner, layer), hook in self._hooked.items()
                                                      if owner == name} for name in experts}):
                yield self
        finally:
            self._hooked = {}

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        self.tracker.begin(layout, num_steps, do_cfg)
        self.steps = window_steps(self.cfg.window, num_steps)
        self.calls = Counter()
        self.step_experts = {}
        self._fixed_values = self._detected_rows = 0
        if self.state is not None:
            self.state.reset_counts()

    def _on_call(self) -> None:
        """The transformer pre-hook's part (eager, outside any compiled region): this call's state, on its device,
        and the host-side accounting of what the block hooks will steer."""
        tracker = self.tracker
        latents = tracker.call_latents()
        batch, device = latents.shape[0], latents.device
        state = self.state
        if state is None or state.key != (device, batch, tracker.layout.num_tokens, tracker.step_calls, tracker.split):
            state = self.state = self._new_state(device, batch)
            self._placed = False
        if not self._placed:  # per-block device tensors, before any (compiled) hook reads them
            for (expert, layer), hook in self._hooked.items():
                if (expert, layer, device) not in self._device_channels:
                    self._device_channels[(expert, layer, device)] = self._block_tensors(hook, device)
                hook.device_channels, hook.shared = self._device_channels[(expert, layer, device)]
            self._placed = True
        rows = tracker.rows(self.branches, batch)
        active = tracker.step in self.steps and rows is not None
        state.set(active, any(name == "cond" for name, _ in tracker.branches_of_call(batch)))
        if not active:
            return
        branch = self._branch_name(rows, batch)
        values_per_channel = (rows.stop - rows.start) * state.steered_tokens
        self.step_experts[tracker.step] = tracker.expert
        channels = self.channels_of(tracker.expert)
        for layer in self.layers_of(tracker.expert):  # every hooked block runs once per transformer call
            self.calls[(layer, tracker.step, branch)] += 1
            if channels[layer] is not None:
                self._fixed_values += channels[layer].shape[0] * values_per_channel
            else:
                self._detected_rows += rows.stop - rows.start

    def _block_tensors(self, hook: LayerSteering, device) -> tuple:
        """A block's fixed channels on `device`, and with shared detection its store of the cond call's channels."""
        channels = None if hook.channels is None else hook.channels.to(device)
        shared = None
        params = self.params
        if params.shared_branches and (hook.channels is None or (params.rule == "max_scaled"
                                                                  and params.reference == "ma_max")):
            k = min(params.detection.max_dims, self.backbone.hidden_dim)
            shared = (persistent_tensor(k, dtype=torch.long, device=device),
                      persistent_tensor(k, dtype=torch.bool, device=device))
        return channels, shared

    def _new_state(self, device: torch.device, batch: int) -> CallState:
        tracker = self.tracker
        # A call of no CFG branch (a guider's perturbed pass) is never steered, also by a traced hook (rows None).
        rows = tracker.steered_rows(self.branches, batch) if tracker.branches_of_call(batch) else None
        groups, cond_rows = 1, slice(None)
        if rows is not None:
            inside = [(name, span) for name, span in tracker.branches_of_call(batch)
                      if span.start >= rows.start and span.stop <= rows.stop]
            groups = len(inside) or 1
            cond = [span for name, span in inside if name == "cond"]
            if cond:
                cond_rows = slice(cond[0].start - rows.start, cond[0].stop - rows.start)
        split = tracker.split
        index, steered_tokens = self.token_index_on(device, split)
        state = CallState((device, batch, tracker.layout.num_tokens, tracker.step_calls, split), rows, index, groups,
                          cond_rows, split, steered_tokens)
        if self.state is not None:
            state.carry_over(self.state)
        return state

    def token_index_on(self, device, split: TokenSplit = WHOLE) -> tuple[torch.Tensor, int]:
        """The steered tokens' indices for the current layout, on `device`, within this rank's chunk under context
        parallelism, and how many tokens of the whole sequence are steered (built once per layout, device, split)."""
        layout = self.tracker.layout
        key = (layout, torch.device(device), split)
        if key not in self._token_index:
            index = layout.indices(self.params.targets, self.params.boundary_width, self.params.boundary_unit)
            self._token_index[key] = split.localize(index, layout.num_tokens).to(device), index.shape[0]
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
        if len(self.expert_names) > 1:  # the steered steps of each expert transformer (Wan2.2-A14B)
            record["experts"] = {expert: sorted(step for step, name in self.step_experts.items() if name == expert)
                                 for expert in self.expert_names}
        detection = self.params.detection
        record["detection"] = {"rule": detection.rule, "ratio": detection.ratio, "floor": detection.floor,
                               "max_dims": detection.max_dims,
                               "branches": "shared" if self.params.shared_branches else "per_branch"}
        if self.cfg.dims == "auto":
            rows = self._detected_rows  # channels per steered batch row and hook call
            record["channels_mean"] = int(self.massive_channels_seen) / rows if rows else 0.0
            record["channels_max"] = detection.max_dims
        elif set(self.expert_channels) == {"*"}:
            record["channels"] = {layer: self.channels[layer].tolist() for layer in self.layers}
        else:  # each attached expert's own
            record["channels"] = {expert: {layer: self.channels_of(expert)[layer].tolist() for layer in self.layers}
                                  for expert in self.expert_names}
        if self.cfg.rule == "max_scaled":
            reference = {"kind": self.params.reference if self.cfg.dims != "auto" else "ma_max"}
            if self.state is not None and hook_calls:
                low, high = self.state.reference_range.tolist()
                if math.isfinite(high):  # 4 significant digits: compiled kernels may reorder the float sums
                    reference.update(min=float(f"{-low:.4g}"), max=float(f"{high:.4g}"))
            record["reference"] = reference
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


def calibration_by_expert(calibration: dict | None) -> dict:
    """{expert name, or "*" for every expert: {layer: channels} or None} of a calibration (see StasSteerer)."""
    if calibration and all(isinstance(key, str) for key in calibration):
        return dict(calibration)
    return {"*": calibration}


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
