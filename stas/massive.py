"""Massive-activation (MA) channel detection: pure tensor functions, no host synchronisation.

A channel's *peak* is its largest |value|. A channel is massive when its peak exceeds `ratio` times the median
channel peak of the same hidden state (the median of D peaks, the lower middle value when D is even). Everything
here returns device tensors of fixed shape, so it can run inside a per-layer hook without a sync.
"""

from __future__ import annotations

import torch


def channel_peaks(hidden: torch.Tensor, dim=1) -> torch.Tensor:
    """Largest |value| of `hidden` over `dim`, reading the tensor once per reduction kernel.

    On CUDA one fused reduction (infinity norm) reads the tensor once; on CPU max and -min over the contiguous
    channel axis are several times faster than the fused norm (measured in BENCHMARKS.md), and exact too.
    """
    if hidden.is_cuda:
        return torch.linalg.vector_norm(hidden, float("inf"), dim=dim)
    return torch.maximum(hidden.amax(dim=dim), hidden.amin(dim=dim).neg())


def top_massive_channels(peaks: torch.Tensor, ratio: float, max_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `max_dims` channels with the largest peaks, and which of them are massive.

    `peaks` is (D,), or (..., D) for many hidden states at once (each row against its own median). Returns
    (indices[..., k], is_massive[..., k]) with k = min(max_dims, D): fixed shapes, so callers can gather and scatter
    without knowing on the host how many channels qualified.
    """
    k = min(int(max_dims), peaks.shape[-1])
    values, indices = torch.topk(peaks, k)
    threshold = ratio * peaks.median(dim=-1, keepdim=True).values
    return indices, values > threshold


def massive_channel_mask(hidden: torch.Tensor, ratio: float, max_dims: int) -> torch.BoolTensor:
    """Boolean mask (D,) of the massive channels of `hidden` ((B, S, D) or (S, D)).

    A channel's peak is its largest |value| over batch and tokens; the mask keeps the channels whose peak exceeds
    `ratio` x the median channel peak, at most the `max_dims` largest.
    """
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, S, D) or (S, D), got shape {tuple(hidden.shape)}")
    peaks = channel_peaks(hidden.reshape(-1, hidden.shape[-1]), dim=0)
    indices, is_massive = top_massive_channels(peaks, ratio, max_dims)
    mask = torch.zeros(hidden.shape[-1], dtype=torch.bool, device=hidden.device)
    return mask.scatter(0, indices, is_massive)



CALIBRATION_KINDS = {"calibrated": "massive", "calibrated_weak": "weak", "calibrated_non_ma": "non_ma"}


def load_calibration(path, dims: str, model_name: str) -> dict[int, list[int]]:
    """Per-layer channels of one kind ('calibrated', 'calibrated_weak', 'calibrated_non_ma') from ma_dims.yaml."""
    import yaml

    data = yaml.safe_load(open(path, encoding="utf-8"))
    if not isinstance(data, dict) or "layers" not in data:
        raise ValueError(f"{path} is not an ma_dims.yaml written by stas.analyze (no 'layers' key)")
    if data.get("model") != model_name:
        raise ValueError(f"{path} was calibrated on model {data.get('model')!r}, not {model_name!r}")
    kind = CALIBRATION_KINDS[dims]
    return {int(layer): [int(c) for c in entry.get(kind, [])] for layer, entry in data["layers"].items()}
