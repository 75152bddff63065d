"""Massive-activation capture: per-block hooks that reduce each block output on the device, as it is produced.

For every captured (block, step, CFG branch) the hook keeps
  - each channel's peak |value| over the tokens (D floats),
  - the mean and max MA magnitude over first-frame, boundary and interior tokens (3 x 2 floats),
and, for the selected (block, step) pairs only, the MA magnitude of every token (S floats). A token's MA magnitude
is its largest |value| over the massive channels of that hidden state, detected on the fly with
`top_massive_channels` (0 when no channel qualifies).

The hooks write into device buffers preallocated on the first call and never read a value on the host, so they add
no synchronisation; `read()` copies all buffers back once after the pipeline call. No hidden state outlives its
hook call: memory is bounded by `capture_bytes` (see docs/analysis.md).

Usage (what stas.ma.analysis does for each prompt):

    capture = MACapture(backbone, selection, ratio=10.0, max_dims=8, boundary_width=1, boundary_unit="rows")
    with capture.attach(pipe.transformer):     # after any steering hook, so it sees the steered outputs
        capture.begin(layout, num_steps=50, do_cfg=True)
        pipe(...)
        readout = capture.read()
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from stas.backbones import CFG_BRANCHES, Backbone
from stas.core.selection import AnalysisSelection
from stas.methods.hooks import BlockHooks
from stas.core.layout import TokenLayout
from stas.core.massive import channel_peaks, top_massive_channels

REGION_NAMES = ("first_frame", "boundary", "interior")
STATS = ("mean", "max")
FLOAT_BYTES = 4


def capture_bytes(layers: int, steps: int, branches: int, hidden_dim: int, profile_pairs: int, tokens: int) -> int:
    """Bytes of the capture buffers: float32 peaks and region statistics per (block, step, branch), plus per-token
    magnitudes of the profile pairs. Independent of the number of prompts and of anything else in the model."""
    per_observation = hidden_dim + len(REGION_NAMES) * len(STATS)
    return FLOAT_BYTES * (layers * steps * branches * per_observation + profile_pairs * branches * tokens)


@dataclass
class CaptureReadout:
    """One pipeline call's reductions, on the CPU. Slots follow the selection's order and `branches`."""

    peaks: torch.Tensor  # (layers, steps, branches, D): channel peak |value| over tokens (max over batch rows)
    regions: torch.Tensor  # (layers, steps, branches, 3 regions, 2 stats): MA magnitude mean and max per region
    tokens: torch.Tensor  # (profile pairs, branches, S): per-token MA magnitude (mean over batch rows)
    branches: tuple[str, ...]


def reduce_hidden(hidden: torch.Tensor, region_masks: torch.Tensor, region_sizes: torch.Tensor,
                  ratio: float, max_dims: int):
    """Reductions of one branch's block output `hidden` (B, S, D); fixed shapes, no host read.

    Returns (peaks (D,), region stats (R, 2), per-token MA magnitude (S,)); `region_masks` is (R, S) float 0/1 and
    `region_sizes` (R,) its row sums. Regions without tokens get NaN.
    """
    peaks = channel_peaks(hidden, dim=1).amax(dim=0)  # the one full read of the hidden states
    channels, is_massive = top_massive_channels(peaks, ratio, max_dims)
    # Only the k ranked channels are gathered; non-massive ones count as 0 (magnitudes are >= 0).
    magnitude = (hidden[:, :, channels].abs().float() * is_massive).amax(dim=-1)  # (B, S)
    tokens = magnitude.mean(dim=0)
    means = (region_masks @ tokens) / region_sizes
    maxes = (magnitude.amax(dim=0) * region_masks).amax(dim=-1)
    maxes = torch.where(region_sizes > 0, maxes, torch.nan)
    return peaks, torch.stack([means, maxes], dim=-1), tokens


class LayerCapture:
    """The capture hook of one block: reduces each branch of the output into the buffers; returns nothing."""

    def __init__(self, capture: "MACapture", layer: int):
        self.capture = capture
        self.layer_slot = capture.selection.layers.index(layer)
        self.profile_slots = {step: capture.profile_slot[(layer, step)]
                              for layer_, step in capture.selection.profile if layer_ == layer}

    def __call__(self, block, args, output):
        capture = self.capture
        step = capture.tracker.step
        step_slot = capture.step_slot.get(step)
        if step_slot is None:
            return None
        hidden = capture.backbone.video_tokens(output)
        buffers = capture.buffers_for(hidden)
        profile_slot = self.profile_slots.get(step)
        for branch, rows in capture.tracker.branches_of_call(hidden.shape[0]):
            branch_slot = capture.branches.index(branch)
            peaks, regions, tokens = reduce_hidden(hidden[rows], buffers["region_masks"], buffers["region_sizes"],
                                                   capture.ratio, capture.max_dims)
            buffers["peaks"][self.layer_slot, step_slot, branch_slot] = peaks
            buffers["regions"][self.layer_slot, step_slot, branch_slot] = regions
            if profile_slot is not None:
                buffers["tokens"][profile_slot, branch_slot] = tokens
        return None


class MACapture:
    """Capture hooks on the selected blocks of a transformer, with their device buffers (module docstring)."""

    def __init__(self, backbone: Backbone, selection: AnalysisSelection, ratio: float, max_dims: int,
                 boundary_width: int, boundary_unit: str):
        self.backbone = backbone
        self.selection = selection
        self.ratio = ratio
        self.max_dims = max_dims
        self.boundary_width = boundary_width
        self.boundary_unit = boundary_unit
        self.step_slot = {step: slot for slot, step in enumerate(selection.steps)}
        self.profile_slot = {pair: slot for slot, pair in enumerate(selection.profile)}
        self.hooks = BlockHooks(backbone)
        self.tracker = self.hooks.tracker
        self.branches: tuple[str, ...] = CFG_BRANCHES
        self.layout: TokenLayout | None = None
        self.buffers: dict | None = None
        self._region_masks: dict = {}

    @contextmanager
    def attach(self, transformer):
        with self.hooks.attached(transformer, {layer: LayerCapture(self, layer) for layer in self.selection.layers}):
            yield self

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        self.tracker.begin(layout, num_steps, do_cfg)
        self.layout = layout
        self.branches = CFG_BRANCHES if do_cfg else ("cond",)
        self.buffers = None  # allocated by the first hook call, on the device the blocks run on

    def buffers_for(self, hidden: torch.Tensor) -> dict:
        self.tracker.check_tokens(hidden.shape[1])
        if self.buffers is None:
            self.buffers = self._allocate(hidden.device)
        return self.buffers

    def _allocate(self, device) -> dict:
        sel, branches, layout = self.selection, len(self.branches), self.layout
        key = (layout, device)
        if key not in self._region_masks:
            masks = torch.stack([layout.mask(region, self.boundary_width, self.boundary_unit)
                                 for region in REGION_NAMES]).float()
            self._region_masks[key] = masks.to(device), masks.sum(dim=1).to(device)
        masks, sizes = self._region_masks[key]
        nan = dict(fill_value=torch.nan, dtype=torch.float32, device=device)
        return {
            "peaks": torch.full((len(sel.layers), len(sel.steps), branches, self.backbone.hidden_dim), **nan),
            "regions": torch.full((len(sel.layers), len(sel.steps), branches, len(REGION_NAMES), len(STATS)), **nan),
            "tokens": torch.full((len(sel.profile), branches, layout.num_tokens), **nan),
            "region_masks": masks,
            "region_sizes": sizes,
        }

    def buffer_bytes(self) -> int:
        """Bytes the result buffers hold now (the region masks, 3 x S floats built once, are not results)."""
        if self.buffers is None:
            return 0
        return sum(self.buffers[name].nbytes for name in ("peaks", "regions", "tokens"))

    def bound_bytes(self) -> int:
        sel = self.selection
        return capture_bytes(len(sel.layers), len(sel.steps), len(self.branches), self.backbone.hidden_dim,
                             len(sel.profile), self.layout.num_tokens)

    def read(self) -> CaptureReadout:
        """Copy the buffers to the CPU (the one host read of a pipeline call); fails if a slot was never written."""
        if self.buffers is None:
            raise RuntimeError("no captured block ran: was the pipeline called between begin() and read()?")
        peaks, regions, tokens = (self.buffers[name].cpu() for name in ("peaks", "regions", "tokens"))
        missing = torch.isnan(peaks[..., 0]).nonzero().tolist()
        if missing:
            layer, step, branch = missing[0]
            raise RuntimeError(
                f"{len(missing)} captured slot(s) were never written, e.g. block {self.selection.layers[layer]} "
                f"step {self.selection.steps[step]} branch {self.branches[branch]}: the pipeline ran fewer steps "
                "than begin() was told"
            )
        return CaptureReadout(peaks, regions, tokens, self.branches)
