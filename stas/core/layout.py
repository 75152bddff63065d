"""The latent token grid of a video DiT and the token regions that STAS and the analysis talk about.

Inside the transformer blocks the video tokens are ordered frame-major: index = f * H * W + h * W + w, where
(F, H, W) is the latent grid after patchifying. The VAEs compress time causally (pixel frame 0 alone, then groups
of `temporal_compression`), so latent frame 0 is the "first frame" and every later latent frame is one temporal
chunk whose head and tail tokens are its "boundary".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import torch

from stas.errors import UserError

REGIONS = ("first_frame", "boundary", "interior", "all")
BOUNDARY_UNITS = ("tokens", "rows")


class LayoutError(UserError, ValueError):
    """A target, unit or width that does not fit the token grid."""


class MakesLatentGrid(Protocol):
    """What TokenLayout.for_video needs of a backbone (stas.backbones.Backbone is one)."""

    def latent_grid(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]: ...


def parse_targets(target: str) -> tuple[str, ...]:
    """Split a union such as ``first_frame+boundary`` into its region names, checking each one."""
    names = tuple(part.strip() for part in str(target).split("+"))
    for name in names:
        if name not in REGIONS:
            raise LayoutError(f"unknown target {name!r} in {target!r}; allowed: {', '.join(REGIONS)} and unions with '+'")
    return names


def chunk_of(frame: int, temporal_compression: int) -> int:
    """The latent frame a pixel frame is encoded into: the causal VAEs encode pixel frame 0 alone, then groups of
    `temporal_compression` frames (latent frame k >= 1 holds pixel frames c*k-c+1 .. c*k)."""
    return 0 if frame == 0 else (frame - 1) // temporal_compression + 1


@dataclass(frozen=True)
class TokenLayout:
    """Latent token grid: `frames` latent frames of `height` x `width` tokens each (after patchifying)."""

    frames: int
    height: int
    width: int

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"TokenLayout.{name} must be a positive integer, got {value!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @classmethod
    def for_video(cls, backbone: MakesLatentGrid, height: int, width: int, num_frames: int) -> "TokenLayout":
        """The grid a backbone makes of a `num_frames` x `height` x `width` pixel video
        (`stas.backbones.get_backbone(name)` gives the backbone of a model config's name)."""
        return cls(*backbone.latent_grid(height, width, num_frames))

    def boundary_span(self, width: int, unit: str) -> int:
        """Number of tokens at each end of a frame that count as boundary."""
        if unit not in BOUNDARY_UNITS:
            raise LayoutError(f"boundary unit {unit!r} is not one of {', '.join(BOUNDARY_UNITS)}")
        if not isinstance(width, int) or width < 1:
            raise LayoutError(f"boundary width must be a positive integer, got {width!r}")
        per_frame, name = (self.tokens_per_frame, "tokens") if unit == "tokens" else (self.height, "rows")
        if 2 * width >= per_frame:
            raise LayoutError(
                f"boundary width {width} {unit} leaves no interior: a latent frame has {per_frame} {name} "
                f"(grid {self.frames}x{self.height}x{self.width}); use a width below {per_frame / 2:g}"
            )
        return width if unit == "tokens" else width * self.width

    def mask(self, target: str, width: int = 1, unit: str = "tokens") -> torch.BoolTensor:
        """Boolean mask over the `num_tokens` video tokens for a region or a '+' union of regions."""
        return _mask(self, parse_targets(target), width, unit).clone()

    def indices(self, target: str, width: int = 1, unit: str = "tokens", device=None) -> torch.LongTensor:
        """Sorted token indices of `mask(target, width, unit)`, on `device`."""
        return _mask(self, parse_targets(target), width, unit).nonzero().squeeze(1).to(device)

    def frame_starts(self) -> list[int]:
        """Token index where each latent frame starts."""
        return [f * self.tokens_per_frame for f in range(self.frames)]


@lru_cache(maxsize=64)
def _mask(layout: TokenLayout, regions: tuple[str, ...], width: int, unit: str) -> torch.Tensor:
    needs_boundary = any(region in ("boundary", "interior") for region in regions)
    span = layout.boundary_span(width, unit) if needs_boundary else 0
    grid = torch.zeros(layout.frames, layout.tokens_per_frame, dtype=torch.bool)
    for region in regions:
        if region == "all":
            grid[:] = True
        elif region == "first_frame":
            grid[0] = True
        elif region == "boundary":
            grid[1:, :span] = True
            grid[1:, layout.tokens_per_frame - span :] = True
        elif region == "interior":
            grid[1:, span : layout.tokens_per_frame - span] = True
    return grid.reshape(-1)
