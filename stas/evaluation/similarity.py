"""Frame-to-frame similarity of one video's features: VBench's consistency and the chunk-aware variants.

Video VAEs with temporal compression c encode pixel frame 0 alone, then groups of c frames (latent frame k >= 1 holds
pixel frames c*k-c+1 .. c*k). A pair of consecutive frames is *intra-chunk* when both frames come from the same
latent frame and *cross-chunk* when they straddle a boundary; STAS acts where the cross-chunk pairs are.
All functions are pure: features (T, C) in, Python floats (or, for `frame_pair_similarity`, a (T-1,) tensor) out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stas.core.layout import chunk_of


def chunk_pairs(num_frames: int, temporal_compression: int = 4) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(intra_pairs, cross_pairs): the consecutive frame pairs (t, t+1) inside one latent chunk, and across two.

    For 17 frames and compression 4 the chunks are [0], [1-4], [5-8], [9-12], [13-16] and the cross pairs are
    (0, 1), (4, 5), (8, 9), (12, 13). A trailing partial chunk (num_frames not c*k+1) counts as a chunk.
    """
    if temporal_compression < 1:
        raise ValueError(f"temporal_compression={temporal_compression!r} must be >= 1")
    intra, cross = [], []
    for t in range(num_frames - 1):
        same = chunk_of(t, temporal_compression) == chunk_of(t + 1, temporal_compression)
        (intra if same else cross).append((t, t + 1))
    return intra, cross


def _cosine(features: torch.Tensor, a: list[int], b: list[int]) -> torch.Tensor:
    return F.cosine_similarity(features[a], features[b], dim=-1)


def _as_features(features) -> torch.Tensor:
    features = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (T, C) with T >= 2 frames; got shape {tuple(features.shape)}")
    return features


def frame_pair_similarity(features) -> torch.Tensor:
    """(T-1,) float64: cos(f[t], f[t+1]) for every consecutive frame pair of one video's features (T, C), in frame
    order; `chunk_pairs` says which of these pairs cross a latent-chunk boundary."""
    features = _as_features(features)
    frames = features.shape[0]
    return _cosine(features, list(range(frames - 1)), list(range(1, frames)))


def cross_chunk(num_frames: int, temporal_compression: int = 4) -> list[bool]:
    """For each consecutive pair (t, t+1), t = 0 .. num_frames-2: whether it crosses a latent-chunk boundary."""
    _, cross = chunk_pairs(num_frames, temporal_compression)
    starts = {t for t, _ in cross}
    return [t in starts for t in range(num_frames - 1)]


def consistency_score(features) -> float:
    """VBench's per-video subject/background consistency of features (T, C):
    mean over t >= 1 of (max(0, cos(f[t-1], f[t])) + max(0, cos(f[0], f[t]))) / 2."""
    features = _as_features(features)
    later = list(range(1, features.shape[0]))
    previous = _cosine(features, [t - 1 for t in later], later).clamp(min=0)
    first = _cosine(features, [0] * len(later), later).clamp(min=0)
    return float(((previous + first) / 2).mean())


def similarity_metrics(features, temporal_compression: int = 4) -> dict[str, tuple[float, int | None]]:
    """{metric: (value, pairs)} for one video: VBench's consistency and the chunk-aware cosine similarities.

    consistency: as `consistency_score`; first_frame_similarity: mean cos(f[0], f[t]) over t >= 1;
    intra_chunk_similarity / cross_chunk_similarity: mean cos of consecutive frames over intra / cross pairs;
    chunk_gap: intra minus cross (positive when chunk boundaries are less smooth than chunk interiors).
    `pairs` is how many frame pairs a value averages over (VBench pools consistency over pairs, not videos; None for
    the gap, a difference); a metric without pairs (no intra pair when every chunk is one frame) is left out.
    """
    features = _as_features(features)
    frames = features.shape[0]
    later = list(range(1, frames))
    metrics = {
        "consistency": (consistency_score(features), frames - 1),
        "first_frame_similarity": (float(_cosine(features, [0] * len(later), later).mean()), frames - 1),
    }
    intra, cross = chunk_pairs(frames, temporal_compression)
    for name, pairs in (("intra_chunk_similarity", intra), ("cross_chunk_similarity", cross)):
        if pairs:
            a, b = zip(*pairs)
            metrics[name] = (float(_cosine(features, list(a), list(b)).mean()), len(pairs))
    if intra and cross:
        metrics["chunk_gap"] = (metrics["intra_chunk_similarity"][0] - metrics["cross_chunk_similarity"][0], None)
    return metrics
