"""Massive-activation (MA) channel detection: pure tensor functions, no host synchronisation.

A channel's *peak* is its largest |value|. A channel is massive when its peak exceeds `ratio` times the median
channel peak of the same hidden state (the median of D peaks, the lower middle value when D is even). Everything
here returns device tensors of fixed shape, so it can run inside a per-layer hook without a sync.
"""

from __future__ import annotations

from pathlib import Path

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


def load_calibration(path, dims: str, model) -> dict[int, list[int]]:
    """Per-layer channels of one kind ('calibrated', 'calibrated_weak', 'calibrated_non_ma') from ma_dims.yaml,
    checked against `model` (a Backbone or a model config: name, num_layers, hidden_dim); ValueError says what in
    the file is wrong."""
    import yaml

    model_name, num_layers, hidden_dim = model.name, model.num_layers, model.hidden_dim
    try:
        data = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise ValueError("is not an ma_dims.yaml written by stas.analyze (it needs 'model' and a 'layers' mapping "
                         "of block index to channel lists)")
    if data.get("model") != model_name:
        raise ValueError(f"was calibrated on model {data.get('model')!r}, not {model_name!r}")
    kind = CALIBRATION_KINDS[dims]
    channels = {}
    for layer, entry in data["layers"].items():
        if not _is_index(layer) or not 0 <= layer < num_layers:
            raise ValueError(f"layers has block {layer!r}; model {model_name!r} has blocks 0..{num_layers - 1}")
        listed = entry.get(kind, []) if isinstance(entry, dict) else None
        if not isinstance(listed, list) or not all(_is_index(channel) for channel in listed):
            raise ValueError(f"layers.{layer}.{kind} must be a list of channel indices (integers), got {listed!r}")
        for channel in listed:
            if not 0 <= channel < hidden_dim:
                raise ValueError(f"layers.{layer}.{kind} has channel {channel}; model {model_name!r} has channels "
                                 f"0..{hidden_dim - 1}")
        if len(set(listed)) != len(listed):
            raise ValueError(f"layers.{layer}.{kind} lists a channel twice: {listed}")
        channels[layer] = listed
    return channels


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
