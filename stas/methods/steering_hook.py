"""The steering hook of one block (LayerSteering): the rule at the steered tokens and channels of a block output,
in place, on the device, from the per-call state the transformer pre-hook wrote (stas.methods.call_state) and the
config as plain values (SteerParams). StasSteerer (stas.methods.stas) decides which blocks get one."""

from __future__ import annotations

import functools
from dataclasses import dataclass
import torch

from stas.core.massive import Detection, channel_peaks, massive_threshold, top_massive_channels
from stas.core.rules import reference_magnitude, steered_values
from stas.methods.call_state import CallState


@dataclass(frozen=True)
class SteerParams:
    """What the steering hooks read of the `steer` and `detect` configs, as plain Python values read once (a hook
    never reads an OmegaConf node: in a compiled region that would break the graph)."""

    rule: str
    alpha: float
    strength: float
    targets: str
    boundary_width: int
    boundary_unit: str
    reference: str  # ma_max | steered (max_scaled's M for fixed channels)
    detection: Detection
    shared_branches: bool  # detect.branches=shared: the cond branch's channels steer both branches

    @classmethod
    def of(cls, cfg, detect=None) -> "SteerParams":
        detection = Detection() if detect is None else Detection.of(detect)
        shared = detect is not None and str(detect.branches) == "shared"
        return cls(str(cfg.rule), float(cfg.alpha), float(cfg.strength), str(cfg.targets), int(cfg.boundary_width),
                   str(cfg.boundary_unit), str(cfg.reference), detection, shared)


class LayerSteering:
    """The steering hook of one block: runs the rule at the steered tokens and channels, in place, on the device."""

    def __init__(self, steerer, layer: int, channels: torch.Tensor | None):  # steerer: its StasSteerer
        self.steerer = steerer
        self.layer = layer
        self.channels = channels  # None: detect the massive channels on every call
        self.device_channels = channels  # `channels` on the device of the calls, placed by the pre-hook
        # Shared channels: what this block's last cond call detected (placed by the pre-hook), for the step's
        # call without the cond branch.
        self.shared: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, block, args, output):
        steerer = self.steerer
        state = steerer.state
        # Eager: outside the window or for an unsteered branch, a host check and nothing else. Traced: the same
        # graph for every call, the gate selects (no host value that changes between calls is read here).
        if not torch.compiler.is_compiling() and (state is None or not state.active):
            return None
        if state.rows is None:  # no call of this run has a steered branch (e.g. uncond without CFG)
            return None
        if steerer.compile_hook and not torch.compiler.is_compiling():
            return compiled_steering()(self, output)
        return self.steer(output)

    def steer(self, output) -> None:
        """The steering of a steered call's block output, in place (traced as it is by compiled_steering and under
        model.compile)."""
        steerer = self.steerer
        state = steerer.state
        gate = state.gate if torch.compiler.is_compiling() else None  # eager hooks run in steered calls only
        hidden = steerer.backbone.video_tokens(output)
        if hidden.shape[1] != state.num_tokens:
            steerer.tracker.check_tokens(hidden.shape[1])
        params = steerer.params
        token_index = state.token_index
        steered = hidden[state.rows]  # a view: steering it writes into the block output
        if self.channels is None or (params.rule == "max_scaled" and params.reference == "ma_max"):
            # the one full read of the hidden states
            found, found_massive, found_peaks = self.detect(steered, state, params.detection)
        if self.channels is None:
            channels, is_massive, peaks = found, found_massive, found_peaks
            massive = is_massive.sum()  # stays on the device: record() reads the totals once
            if gate is not None:
                massive = massive * gate
            state.massive_seen.add_(massive)
            state.values_steered.add_(massive * state.steered_tokens)
        else:
            channels = self.device_channels
            if channels.device != hidden.device:  # eager only: the pre-hook places them for compiled runs
                channels = self.device_channels = self.channels.to(hidden.device)
            peaks = state.split.max(channel_peaks(steered[:, :, channels], dim=1))  # reads only the steered channels
            channels = channels.expand(steered.shape[0], -1)
            is_massive = None  # the steered values of fixed channels are counted on the host by the pre-hook
        reference = reference_magnitude(peaks, torch.ones_like(peaks, dtype=torch.bool) if is_massive is None
                                        else is_massive, params.rule)
        if params.rule == "max_scaled":
            if self.channels is not None and params.reference == "ma_max":
                # The layer's true-MA maximum; where no channel of the state is massive, the steered channels' own.
                layer_max = reference_magnitude(found_peaks, found_massive, params.rule)
                reference = torch.where(layer_max > 0, layer_max, reference)
            state.note_reference(reference.flatten(), None if is_massive is None else is_massive.any(dim=-1), gate)
        steer_tokens_(steered, token_index, channels, is_massive, reference, params, gate=gate)
        return None

    def detect(self, steered: torch.Tensor, state: CallState, detection: Detection):
        """The massive channels of each steered row's detection group: (channels (R, k), is_massive (R, k), their
        peaks (R, k)); per CFG branch, or the cond branch's for every row (shared)."""
        rows, split = steered.shape[0], state.split
        row_peaks = split.max(channel_peaks(steered, dim=1))  # (R, D), of the whole sequence under context parallelism
        if self.shared is None:
            groups = state.groups
            source, source_peaks = steered.unflatten(0, (groups, -1)), row_peaks.unflatten(0, (groups, -1)).amax(1)
        else:
            source, source_peaks = steered[state.cond_rows][None], row_peaks[state.cond_rows].amax(0, keepdim=True)
        threshold = massive_threshold(source, source_peaks, detection, split)
        channels, is_massive = top_massive_channels(source_peaks, threshold, detection.max_dims)  # (G, k)
        if self.shared is not None:
            stored_channels, stored_massive = self.shared
            if torch.compiler.is_compiling():
                channels = torch.where(state.has_cond, channels[0], stored_channels)
                is_massive = torch.where(state.has_cond, is_massive[0], stored_massive)
            elif state.cond_present:
                channels, is_massive = channels[0], is_massive[0]
            else:
                channels, is_massive = stored_channels, stored_massive
            stored_channels.copy_(channels)
            stored_massive.copy_(is_massive)
            channels, is_massive = channels.expand(rows, -1), is_massive.expand(rows, -1)
        else:
            repeat = rows // channels.shape[0]
            channels, is_massive = channels.repeat_interleave(repeat, 0), is_massive.repeat_interleave(repeat, 0)
        return channels, is_massive, row_peaks.gather(1, channels)


@functools.cache
def compiled_steering():
    """LayerSteering.steer torch.compiled once for every block (steer.compile_hook): in an eager transformer the
    hook is some twenty small kernels whose launches cost about a millisecond per call on a GPU (BENCHMARKS.md);
    compiled, they fuse into a few. One compiled function for all blocks and both branches: a block's hook differs
    only in tensors, which dynamo guards by shape and dtype, not by identity (no recompile from block to block)."""
    return torch.compile(LayerSteering.steer)


def steer_tokens_(hidden, token_index, channels, is_massive, reference, cfg, gate=None) -> None:
    """Apply the rule in place at hidden[r, token_index, channels[r]] for every row r; `channels` and `is_massive`
    are (R, k), `reference` from `reference_magnitude`. `cfg` has rule, alpha and strength; only the massive
    channels change (all of them when `is_massive` is None), and nothing where a 0-d bool `gate` is False."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    index = (rows[:, None, None], token_index[None, :, None], channels[:, None, :])
    values = hidden[index]
    new = steered_values(values, reference, cfg.rule, cfg.alpha, cfg.strength)
    if is_massive is not None:
        steered = is_massive[:, None, :] if gate is None else is_massive[:, None, :] & gate
        new = torch.where(steered, new, values)
    elif gate is not None:
        new = torch.where(gate, new, values)
    hidden[index] = new
