"""Massive-activation capture: per-block hooks that reduce each block output on the device, as it is produced.

For every captured (block, step, CFG branch) the hook keeps
  - each channel's peak |value| over the tokens (D floats) and the detection threshold of the hidden state (1),
  - the mean and max MA magnitude over first-frame, boundary and interior tokens (3 x 2 floats),
and, for the selected (block, step) pairs only, the MA magnitude of every token (S floats). A token's MA magnitude
is its largest |value| over the massive channels of that hidden state, detected on the fly with the run's
`detect` rule (stas.core.massive; 0 when no channel qualifies).

The hooks write into device buffers preallocated on the first call and never read a value on the host, so they add
no synchronisation; `read()` copies all buffers back once after the pipeline call. No hidden state outlives its
hook call: memory is bounded by `capture_bytes` (see docs/analysis.md).

Compile-friendly as the steering hooks are (stas.methods.stas): the transformer's pre-hook (eager) allocates the
buffers and writes which slot this call fills (step, CFG branch) into small device tensors; the block hooks index
the buffers with them and write through a gate, so a compiled block sees the same graph at every step.

Usage (what stas.ma.analysis does for each prompt):

    capture = MACapture(backbone, selection, Detection(), boundary_width=1, boundary_unit="rows")
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
from stas.core.layout import TokenLayout
from stas.core.massive import Detection, detect_massive
from stas.core.parallel import WHOLE, TokenSplit
from stas.core.selection import AnalysisSelection
from stas.methods.hooks import BlockHooks, persistent_tensor

REGION_NAMES = ("first_frame", "boundary", "interior")
STATS = ("mean", "max")
FLOAT_BYTES = 4
RESULT_BUFFERS = ("peaks", "thresholds", "regions", "tokens")


def capture_bytes(layers: int, steps: int, branches: int, hidden_dim: int, profile_pairs: int, tokens: int) -> int:
    """Bytes of the capture buffers: float32 peaks, threshold and region statistics per (block, step, branch), plus
    per-token magnitudes of the profile pairs. Independent of the number of prompts and of anything else in the
    model."""
    per_observation = hidden_dim + 1 + len(REGION_NAMES) * len(STATS)
    return FLOAT_BYTES * (layers * steps * branches * per_observation + profile_pairs * branches * tokens)


@dataclass
class CaptureReadout:
    """One pipeline call's reductions, on the CPU. Slots follow the selection's order and `branches`."""

    peaks: torch.Tensor  # (layers, steps, branches, D): channel peak |value| over tokens (max over batch rows)
    thresholds: torch.Tensor  # (layers, steps, branches): the detection threshold of each hidden state
    regions: torch.Tensor  # (layers, steps, branches, 3 regions, 2 stats): MA magnitude mean and max per region
    tokens: torch.Tensor  # (profile pairs, branches, S): per-token MA magnitude (mean over batch rows)
    branches: tuple[str, ...]


def reduce_hidden(hidden: torch.Tensor, region_masks: torch.Tensor, region_sizes: torch.Tensor,
                  detection: Detection, split: TokenSplit = WHOLE):
    """Reductions of one branch's block output `hidden` (B, S, D); fixed shapes, no host read.

    Returns (peaks (D,), threshold (), region stats (R, 2), per-token MA magnitude (S,)); `region_masks` is (R, S)
    float 0/1 and `region_sizes` (R,) its row sums. Regions without tokens get NaN. Under context parallelism
    `hidden` holds this rank's chunk of the S tokens: the peaks are all-reduced, the per-token magnitudes (S floats,
    not the hidden state) gathered, and every rank returns the whole sequence's reductions.
    """
    channels, is_massive, peaks, threshold = detect_massive(hidden.reshape(1, -1, hidden.shape[-1]), detection, split)
    channels, is_massive, peaks, threshold = channels[0], is_massive[0], peaks[0], threshold[0]
    # Only the k ranked channels are gathered; non-massive ones count as 0 (magnitudes are >= 0).
    magnitude = (hidden[:, :, channels].abs().float() * is_massive).amax(dim=-1)  # (B, S)
    tokens, token_max = magnitude.mean(dim=0), magnitude.amax(dim=0)
    if split.parallel:  # the whole sequence's per-token values, in rank order
        tokens, token_max = split.gather(torch.stack([tokens, token_max]), dim=1)
    means = (region_masks @ tokens) / region_sizes
    maxes = (token_max * region_masks).amax(dim=-1)
    maxes = torch.where(region_sizes > 0, maxes, torch.nan)
    return peaks, threshold, torch.stack([means, maxes], dim=-1), tokens


class LayerCapture:
    """The capture hook of one block: reduces each branch of the output into the buffers; returns nothing."""

    def __init__(self, capture: "MACapture", layer: int):
        self.capture = capture
        self.layer_slot = capture.selection.layers.index(layer)
        # The slot as a device tensor (placed by the pre-hook): the same graph serves every block. Slots are
        # 1-element tensors, not 0-d ones: indexing with a 0-d tensor reads it on the host.
        self.slot = torch.tensor([self.layer_slot])

    def __call__(self, block, args, output):
        capture = self.capture
        state = capture.state
        # Eager: a step that is not captured costs a host check. Traced: always computed, written through the gate.
        if not torch.compiler.is_compiling() and (state is None or not state.active):
            return None
        hidden = capture.backbone.video_tokens(output)
        buffers = capture.buffers_for(hidden)
        layer = self.slot
        if layer.device != hidden.device:  # eager only: the pre-hook places it for compiled runs
            layer = self.slot = self.slot.to(hidden.device)
        step, gate = state.step_slot, state.gate
        if capture.profile_table is not None:
            profile = capture.profile_table[layer, step]
            profile_gate = capture.profile_mask[layer, step].squeeze(0) & gate
        for rows, branch in state.branches:
            peaks, threshold, regions, tokens = reduce_hidden(hidden[rows], buffers["region_masks"],
                                                              buffers["region_sizes"], capture.detection,
                                                              capture.tracker.split)
            _write(buffers["peaks"], (layer, step, branch), peaks, gate)
            _write(buffers["thresholds"], (layer, step, branch), threshold, gate)
            _write(buffers["regions"], (layer, step, branch), regions, gate)
            if capture.profile_table is not None:
                _write(buffers["tokens"], (profile, branch), tokens, profile_gate)
        return None


def _write(buffer: torch.Tensor, index: tuple, value: torch.Tensor, gate: torch.Tensor) -> None:
    """buffer[index] = value where `gate` (0-d bool) is True; the slot keeps its value otherwise. `index` holds
    1-element index tensors (advanced indexing: no host read)."""
    buffer[index] = torch.where(gate, value, buffer[index])


class CaptureState:
    """The capture hooks' per-call state on the device, written by the transformer pre-hook (eager) only:
    `gate` (0-d bool, this call's step is captured), `step_slot` (1-element long), and per CFG branch of the call its
    batch rows (the same in every call) and its buffer slot (1-element long). `active` mirrors `gate` on the host."""

    def __init__(self, device: torch.device, rows: tuple[slice, ...]):
        self.device, self.rows = device, rows
        self.gate = persistent_tensor((), dtype=torch.bool, device=device)
        self.step_slot = persistent_tensor(1, dtype=torch.long, device=device)
        self.branches = tuple((span, persistent_tensor(1, dtype=torch.long, device=device)) for span in rows)
        self.active = False
        self._host = {"step": 0, "branches": [0] * len(rows)}  # what the device tensors hold now

    def set(self, step_slot: int | None, branch_slots: list[int]) -> None:
        active = step_slot is not None
        if active != self.active:
            self.gate.fill_(active)  # kernel launches with host scalars: no synchronisation
            self.active = active
        if active and step_slot != self._host["step"]:
            self.step_slot.fill_(step_slot)
            self._host["step"] = step_slot
        for index, ((_, tensor), slot) in enumerate(zip(self.branches, branch_slots)):
            if slot != self._host["branches"][index]:
                tensor.fill_(slot)
                self._host["branches"][index] = slot


class MACapture:
    """Capture hooks on the selected blocks of a transformer, with their device buffers (module docstring)."""

    def __init__(self, backbone: Backbone, selection: AnalysisSelection, detection: Detection,
                 boundary_width: int, boundary_unit: str):
        self.backbone = backbone
        self.selection = selection
        self.detection = detection
        self.boundary_width = boundary_width
        self.boundary_unit = boundary_unit
        self.step_slot = {step: slot for slot, step in enumerate(selection.steps)}
        self.profile_slot = {pair: slot for slot, pair in enumerate(selection.profile)}
        self.hooks = BlockHooks(backbone)
        self.tracker = self.hooks.tracker
        self.tracker.listeners.append(self._on_call)
        self.branches: tuple[str, ...] = CFG_BRANCHES
        self.layout: TokenLayout | None = None
        self.buffers: dict | None = None
        self.state: CaptureState | None = None
        self.profile_table: torch.Tensor | None = None  # (layer slot, step slot) -> profile slot, on the device
        self.profile_mask: torch.Tensor | None = None  # (layer slot, step slot) -> whether it is a profile pair
        self._region_masks: dict = {}
        self._hooked: list[LayerCapture] = []
        self._placed = False  # the attached hooks' slots and the profile table are on the state's device
        self._on_device: dict = {}  # device -> (layer slots, profile table, profile mask) there, made once

    @contextmanager
    def attach(self, transformer):
        self._hooked = [LayerCapture(self, layer) for layer in self.selection.layers]
        self._placed = False
        try:
            with self.hooks.attached(transformer, dict(zip(self.selection.layers, self._hooked))):
                yield self
        finally:
            self._hooked = []

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        self.tracker.begin(layout, num_steps, do_cfg)
        self.layout = layout
        self.branches = CFG_BRANCHES if do_cfg else ("cond",)
        self.buffers = None  # allocated by the pre-hook of the first transformer call, on its device

    def _on_call(self) -> None:
        """The transformer pre-hook's part (eager, outside any compiled region): the buffers on the call's device,
        and which step and branch slots this call fills."""
        tracker = self.tracker
        latents = tracker.call_latents()
        batch, device = latents.shape[0], latents.device
        if self.buffers is None or self.buffers["peaks"].device != device:
            self.buffers = self._allocate(device)
        found = tracker.branches_of_call(batch)
        rows = tuple(span for _, span in found)
        if self.state is None or (self.state.device, self.state.rows) != (device, rows):
            self.state = CaptureState(device, rows)
            self._placed = False
        if not self._placed:  # before any (compiled) hook reads them
            self._place(device)
            self._placed = True
        self.state.set(self.step_slot.get(tracker.step), [self.branches.index(name) for name, _ in found])

    def _place(self, device) -> None:
        """The attached hooks' slots and the profile table on `device` (made once per device)."""
        if device not in self._on_device:
            sel = self.selection
            with torch.inference_mode(False):
                slots = [torch.tensor([slot]).to(device) for slot in range(len(sel.layers))]
                table = profile = None
                if sel.profile:
                    table = torch.zeros(len(sel.layers), len(sel.steps), dtype=torch.long)
                    for (layer, step), slot in self.profile_slot.items():
                        table[sel.layers.index(layer), self.step_slot[step]] = slot + 1
                    table, profile = (table - 1).clamp(min=0).to(device), (table > 0).to(device)
            self._on_device[device] = slots, table, profile
        slots, self.profile_table, self.profile_mask = self._on_device[device]
        for hook in self._hooked:
            hook.slot = slots[hook.layer_slot]

    def buffers_for(self, hidden: torch.Tensor) -> dict:
        if hidden.shape[1] != self.tracker.local_tokens():
            self.tracker.check_tokens(hidden.shape[1])
        if self.buffers is None:  # eager, hooks called without the pre-hook (tests)
            self.buffers = self._allocate(hidden.device)
        return self.buffers

    def _allocate(self, device) -> dict:
        sel, branches, layout = self.selection, len(self.branches), self.layout
        key = (layout, torch.device(device))
        if key not in self._region_masks:
            with torch.inference_mode(False):  # kept across pipeline calls, inside inference_mode or not
                masks = torch.stack([layout.mask(region, self.boundary_width, self.boundary_unit)
                                     for region in REGION_NAMES]).float()
                self._region_masks[key] = masks.to(device), masks.sum(dim=1).to(device)
        masks, sizes = self._region_masks[key]
        nan = dict(fill_value=torch.nan, dtype=torch.float32, device=device)
        return {
            "peaks": torch.full((len(sel.layers), len(sel.steps), branches, self.backbone.hidden_dim), **nan),
            "thresholds": torch.full((len(sel.layers), len(sel.steps), branches), **nan),
            "regions": torch.full((len(sel.layers), len(sel.steps), branches, len(REGION_NAMES), len(STATS)), **nan),
            "tokens": torch.full((len(sel.profile), branches, layout.num_tokens), **nan),
            "region_masks": masks,
            "region_sizes": sizes,
        }

    def buffer_bytes(self) -> int:
        """Bytes the result buffers hold now (the region masks, 3 x S floats built once, are not results)."""
        if self.buffers is None:
            return 0
        return sum(self.buffers[name].nbytes for name in RESULT_BUFFERS)

    def bound_bytes(self) -> int:
        sel = self.selection
        return capture_bytes(len(sel.layers), len(sel.steps), len(self.branches), self.backbone.hidden_dim,
                             len(sel.profile), self.layout.num_tokens)

    def read(self) -> CaptureReadout:
        """Copy the buffers to the CPU (the one host read of a pipeline call); fails if a slot was never written."""
        if self.buffers is None:
            raise RuntimeError("no captured block ran: was the pipeline called between begin() and read()?")
        peaks, thresholds, regions, tokens = (self.buffers[name].cpu() for name in RESULT_BUFFERS)
        missing = torch.isnan(peaks[..., 0]).nonzero().tolist()
        if missing:
            layer, step, branch = missing[0]
            raise RuntimeError(
                f"{len(missing)} captured slot(s) were never written, e.g. block {self.selection.layers[layer]} "
                f"step {self.selection.steps[step]} branch {self.branches[branch]}: the pipeline ran fewer steps "
                "than begin() was told"
            )
        return CaptureReadout(peaks, thresholds, regions, tokens, self.branches)
