"""The steering hooks' per-call device state (stas.methods.stas): what the transformer pre-hook decides for each
call, as small device tensors a traced hook can read without a host synchronisation or a recompile."""

from __future__ import annotations

import torch

from stas.core.parallel import WHOLE, TokenSplit
from stas.methods.hooks import persistent_tensor


class CallState:
    """The steering hooks' per-call state on the device, written by the transformer pre-hook (eager) only.

    `gate` (0-d bool): this call steers (its step is in the window and it has a steered branch). `rows`: the batch
    rows of the steered branches (the same in every call that has them), `token_index` the steered tokens.
    Detection runs on `groups` equal parts of the rows (one per CFG branch among them, or one), or, with shared
    channels, on `cond_rows` (the cond branch within the rows) when `has_cond` (0-d bool): a call without the cond
    branch steers with the channels its step's cond call found. The counters hold the detected MA channels, the
    steered values and the range of max_scaled's reference magnitude. `active`/`cond_present` mirror `gate` and
    `has_cond` on the host for eager hooks.

    Under context parallelism (`split`) the hooks see this rank's chunk of the tokens: `num_tokens` is its size,
    `token_index` the steered tokens inside it, and `steered_tokens` counts the steered tokens of the whole sequence
    (what every rank adds to the counters, so that each holds the single-process totals)."""

    def __init__(self, key: tuple, rows: slice | None, token_index: torch.Tensor, groups: int, cond_rows: slice,
                 split: TokenSplit = WHOLE, steered_tokens: int | None = None):
        self.key = key  # (device, batch, tokens, CFG, split): what the state was made for
        device, _, tokens = key[:3]
        self.split, self.num_tokens = split, split.local_tokens(tokens)
        self.rows, self.token_index, self.groups, self.cond_rows = rows, token_index, groups, cond_rows
        self.steered_tokens = token_index.shape[0] if steered_tokens is None else steered_tokens
        self.gate = persistent_tensor((), dtype=torch.bool, device=device)
        self.has_cond = persistent_tensor((), dtype=torch.bool, device=device)
        self.massive_seen = persistent_tensor((), dtype=torch.long, device=device)
        self.values_steered = persistent_tensor((), dtype=torch.long, device=device)
        self.reference_range = persistent_tensor(2, dtype=torch.float32, device=device)  # (-min, max)
        self.active = False
        self.cond_present = False
        self.reset_counts()

    def set(self, active: bool, has_cond: bool) -> None:
        if active != self.active:
            self.gate.fill_(active)  # a kernel launch with a host scalar: no synchronisation
            self.active = active
        if has_cond != self.cond_present:
            self.has_cond.fill_(has_cond)
            self.cond_present = has_cond

    def reset_counts(self) -> None:
        self.massive_seen.zero_()
        self.values_steered.zero_()
        self.reference_range.fill_(-torch.inf)

    def note_reference(self, reference: torch.Tensor, steered_rows: torch.Tensor | None, gate) -> None:
        """Widen the recorded range of max_scaled's M by this call's (R,) values, of the rows that steer
        something (`steered_rows`, (R,) bool; None: every row)."""
        reference = reference.float()
        low, high = reference.neg(), reference
        if steered_rows is not None:
            low, high = torch.where(steered_rows, low, -torch.inf), torch.where(steered_rows, high, -torch.inf)
        extremes = torch.stack([low.amax(), high.amax()])
        if gate is not None:
            extremes = torch.where(gate, extremes, -torch.inf)
        torch.maximum(self.reference_range, extremes, out=self.reference_range)

    def carry_over(self, previous: "CallState") -> None:
        """A new device or batch within a run: the totals of the previous state go on."""
        self.massive_seen.add_(previous.massive_seen.to(self.massive_seen.device))
        self.values_steered.add_(previous.values_steered.to(self.values_steered.device))
        torch.maximum(self.reference_range, previous.reference_range.to(self.reference_range.device),
                      out=self.reference_range)
