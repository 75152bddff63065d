"""Context parallelism as the steering and capture hooks see it: a rank's share of the video tokens, and the
collectives that turn a statistic of that share into the statistic of the whole sequence.

Under context parallelism (diffusers' `enable_parallelism`, stas.backbones.parallel) every rank runs every block on
a contiguous, equal chunk of the flattened video tokens: rank r of W holds tokens [r * S/W, (r + 1) * S/W). The
token regions (first frame, boundary) are defined on the whole grid (stas.core.layout), so a hook takes the global
indices that fall in its chunk, shifted to the chunk's start (`localize`); and a statistic over all tokens (a
channel's peak, the mean |value| a detection threshold scales) is the all-reduce of the ranks' partial ones (`max`,
`sum`), a collective on device tensors with no host read. One process is `TokenSplit()`: every method is then the
identity, and nothing is communicated.

The collectives are torch's functional ones (torch.distributed._functional_collectives), which torch.compile traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stas.errors import UserError


class SplitError(UserError, ValueError):
    """A sequence that does not split evenly across the context-parallel ranks."""


@dataclass(frozen=True, eq=False)
class TokenSplit:
    """Rank `rank` of `world` context-parallel ranks, communicating in `group` (a torch.distributed process group;
    None for one process)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not one of the {self.world} ranks")
        if self.world > 1 and self.group is None:
            raise ValueError("a split across several ranks needs their process group")

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def span(self, num_tokens: int) -> tuple[int, int]:
        """[start, stop) of this rank's tokens in a sequence of `num_tokens` (contiguous equal chunks in rank order,
        as diffusers' EquipartitionSharder makes them: `tensor.chunk(world)[rank]`)."""
        if num_tokens % self.world:
            raise SplitError(f"{num_tokens} video tokens do not split evenly across {self.world} context-parallel "
                             f"ranks; choose a video size whose token count is a multiple of {self.world}")
        size = num_tokens // self.world
        return self.rank * size, (self.rank + 1) * size

    def local_tokens(self, num_tokens: int) -> int:
        """How many of `num_tokens` tokens this rank holds."""
        start, stop = self.span(num_tokens)
        return stop - start

    def localize(self, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The global token indices `index` that lie in this rank's chunk, as indices into the chunk (prepared once
        per layout, outside the hooks: it selects on the host)."""
        if not self.parallel:
            return index
        start, stop = self.span(num_tokens)
        return index[(index >= start) & (index < stop)] - start

    def local(self, tensor: torch.Tensor, num_tokens: int, dim: int = -1) -> torch.Tensor:
        """This rank's chunk of a tensor laid out over all `num_tokens` tokens along `dim` (e.g. a region mask)."""
        if not self.parallel:
            return tensor
        start, stop = self.span(num_tokens)
        return tensor.narrow(dim, start, stop - start)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over the ranks (exact: the result is the single-process one bit for bit)."""
        return self._all_reduce(tensor, "max")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the ranks (a float sum in another order than one process's: equal to rounding)."""
        return self._all_reduce(tensor, "sum")

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' tensors concatenated along `dim` in rank order: per-token values of the whole sequence."""
        if not self.parallel:
            return tensor
        from torch.distributed import _functional_collectives as funcol

        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        return gather(tensor.contiguous(), dim, self.group)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not self.parallel:
            return tensor
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(tensor.contiguous(), op, self.group)


WHOLE = TokenSplit()  # one process: the whole sequence, no communication
