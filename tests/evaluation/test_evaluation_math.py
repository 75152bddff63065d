"""Evaluation math: VBench's aggregate scores, chunk pairs, consistency and chunk-aware similarity, aggregation."""

import math
import random
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stas.evaluation import aggregate_metrics, chunk_pairs, consistency_score, similarity_metrics, vbench_scores
from stas.evaluation.scores import DIMENSIONS, QUALITY_DIMENSIONS, SEMANTIC_DIMENSIONS

from evaluation_helpers import import_from

VBENCH_MIRROR = Path("/work/.mirror/Vchitect+VBench/repo")


def full_raw(seed=0):
    rng = random.Random(seed)
    return {d: rng.uniform(0.3, 1.0) for d in DIMENSIONS}


def test_vbench_scores_by_hand():
    raw = full_raw()
    # VBench's scripts/constant.py, written out again: (raw - Min) / (Max - Min) * weight
    quality = [((raw["subject_consistency"] - 0.1462) / (1.0 - 0.1462)),
               ((raw["background_consistency"] - 0.2615) / (1.0 - 0.2615)),
               ((raw["temporal_flickering"] - 0.6293) / (1.0 - 0.6293)),
               ((raw["motion_smoothness"] - 0.706) / (0.9975 - 0.706)),
               raw["aesthetic_quality"], raw["imaging_quality"], 0.5 * raw["dynamic_degree"]]
    semantic = [raw["object_class"], raw["multiple_objects"], raw["human_action"], raw["color"],
                raw["spatial_relationship"], raw["scene"] / 0.8222,
                (raw["appearance_style"] - 0.0009) / (0.2855 - 0.0009), raw["temporal_style"] / 0.364,
                raw["overall_consistency"] / 0.364]
    q, s = sum(quality) / 6.5, sum(semantic) / 9
    scores = vbench_scores(raw)
    assert scores["quality_score"] == pytest.approx(100 * q, abs=1e-9)
    assert scores["semantic_score"] == pytest.approx(100 * s, abs=1e-9)
    assert scores["total_score"] == pytest.approx(100 * (4 * q + s) / 5, abs=1e-9)
    assert scores["missing"] == {}
    assert scores["normalized"]["dynamic_degree"] == pytest.approx(100 * raw["dynamic_degree"])


@pytest.mark.skipif(not (VBENCH_MIRROR / "HEAD").exists(), reason="VBench's repository is not mirrored here")
def test_vbench_scores_equal_vbench_cal_final_score(tmp_path):
    # VBench's own scripts/cal_final_score.py and constant.py, taken from its repository.
    for name in ("cal_final_score.py", "constant.py"):
        text = subprocess.run(["git", "-C", str(VBENCH_MIRROR), "show", f"HEAD:scripts/{name}"],
                              capture_output=True, text=True, check=True).stdout
        (tmp_path / name).write_text(text)
    theirs = import_from(tmp_path, "cal_final_score")
    for seed in range(5):
        raw = full_raw(seed)
        normalized = theirs.get_nomalized_score({k.replace("_", " "): v for k, v in raw.items()})
        quality, semantic = theirs.get_quality_score(normalized), theirs.get_semantic_score(normalized)
        ours = vbench_scores(raw)
        assert ours["quality_score"] == pytest.approx(100 * quality, abs=1e-9)
        assert ours["semantic_score"] == pytest.approx(100 * semantic, abs=1e-9)
        assert ours["total_score"] == pytest.approx(100 * theirs.get_final_score(quality, semantic), abs=1e-9)


def test_vbench_scores_partial_sets_never_give_a_total():
    raw = full_raw()
    quality_only = vbench_scores({d: raw[d] for d in QUALITY_DIMENSIONS})
    assert quality_only["quality_score"] == pytest.approx(vbench_scores(raw)["quality_score"])
    assert "semantic_score" not in quality_only and "total_score" not in quality_only
    assert quality_only["missing"] == {"semantic_score": list(SEMANTIC_DIMENSIONS),
                                       "total_score": list(SEMANTIC_DIMENSIONS)}
    one = vbench_scores({"temporal_flickering": 0.9})
    assert set(one) == {"normalized", "missing", "invalid", "withheld"}
    assert one["invalid"] == one["withheld"] == {}
    assert one["normalized"] == {"temporal_flickering": pytest.approx(100 * (0.9 - 0.6293) / (1 - 0.6293))}
    assert "temporal_flickering" not in one["missing"]["quality_score"]
    assert len(one["missing"]["total_score"]) == 15


def test_chunk_pairs():
    intra, cross = chunk_pairs(17)
    assert cross == [(0, 1), (4, 5), (8, 9), (12, 13)]
    assert intra == [(t, t + 1) for t in range(1, 16) if t % 4 != 0]
    assert sorted(intra + cross) == [(t, t + 1) for t in range(16)]
    assert chunk_pairs(81)[1] == [(0, 1)] + [(4 * k, 4 * k + 1) for k in range(1, 20)]
    assert chunk_pairs(17, temporal_compression=8) == ([(t, t + 1) for t in range(1, 16) if t != 8], [(0, 1), (8, 9)])
    assert chunk_pairs(4, temporal_compression=1) == ([], [(0, 1), (1, 2), (2, 3)])
    assert chunk_pairs(1) == ([], [])
    assert chunk_pairs(7) == ([(1, 2), (2, 3), (3, 4), (5, 6)], [(0, 1), (4, 5)])  # a trailing partial chunk
    with pytest.raises(ValueError):
        chunk_pairs(17, temporal_compression=0)


def test_consistency_score_follows_vbench_loop():
    torch.manual_seed(0)
    features = torch.randn(9, 16) + 0.5
    features[5] = -features[0]  # a negative cosine, clamped to 0 by VBench
    # VBench's loop (subject_consistency.py), written out: normalised features, per frame t >= 1
    normed = F.normalize(features, dim=-1)
    total = 0.0
    for t in range(1, 9):
        previous = max(0.0, F.cosine_similarity(normed[t - 1:t], normed[t:t + 1]).item())
        first = max(0.0, F.cosine_similarity(normed[0:1], normed[t:t + 1]).item())
        total += (previous + first) / 2
    assert consistency_score(features) == pytest.approx(total / 8, abs=1e-6)
    assert consistency_score(features[[0, 0, 0]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="T >= 2"):
        consistency_score(features[:1])


def test_similarity_metrics_see_chunk_boundaries():
    torch.manual_seed(1)
    chunks = torch.randn(5, 32)  # latent frames of a 17-frame video
    frames = torch.stack([chunks[0 if t == 0 else (t - 1) // 4 + 1] for t in range(17)])
    frames = frames + 0.01 * torch.randn(17, 32)
    metrics = similarity_metrics(frames, temporal_compression=4)
    assert metrics["intra_chunk_similarity"][0] > 0.99
    assert metrics["cross_chunk_similarity"][0] < 0.5
    assert metrics["chunk_gap"] == (pytest.approx(metrics["intra_chunk_similarity"][0]
                                                  - metrics["cross_chunk_similarity"][0]), None)
    assert metrics["intra_chunk_similarity"][1] == 12 and metrics["cross_chunk_similarity"][1] == 4
    cos = F.cosine_similarity(frames[0:1].double(), frames[1:].double()).mean().item()
    assert metrics["first_frame_similarity"] == (pytest.approx(cos), 16)
    assert metrics["consistency"] == (pytest.approx(consistency_score(frames)), 16)
    # Chunked by 8 instead, the pairs at 4|5 and 12|13 are intra-chunk: the intra mean drops
    assert similarity_metrics(frames, temporal_compression=8)["intra_chunk_similarity"][0] < 0.9
    assert "intra_chunk_similarity" not in similarity_metrics(frames[:2])


def test_aggregate_metrics_pools_like_vbench():
    rows = [
        {"video": "a-0.mp4", "evaluator": "vbench", "metric": "subject_consistency", "value": 0.9, "weight": 16},
        {"video": "b-0.mp4", "evaluator": "vbench", "metric": "subject_consistency", "value": 0.6, "weight": 4},
        {"video": "a-0.mp4", "evaluator": "vbench", "metric": "temporal_flickering", "value": 0.95, "weight": 1},
        {"video": "b-0.mp4", "evaluator": "vbench", "metric": "temporal_flickering", "value": 0.85, "weight": 1},
        {"video": "a-0.mp4", "evaluator": "pixel", "metric": "chunk_gap", "value": 0.1},
        {"video": "b-0.mp4", "evaluator": "pixel", "metric": "chunk_gap", "value": 0.3},
        {"video": "c-0.mp4", "evaluator": "pixel", "metric": "error", "value": None, "error": "cannot decode"},
    ]
    result = aggregate_metrics(rows)
    subject = result["metrics"]["vbench/subject_consistency"]
    assert subject["mean"] == pytest.approx(0.75) and subject["count"] == 2
    assert subject["pooled"] == pytest.approx((0.9 * 16 + 0.6 * 4) / 20)
    assert result["metrics"]["pixel/chunk_gap"] == {"mean": pytest.approx(0.2), "std": pytest.approx(math.sqrt(0.02)),
                                                    "count": 2}
    assert result["vbench"]["dimensions"] == {"subject_consistency": pytest.approx(0.84),
                                              "temporal_flickering": pytest.approx(0.9)}
    assert result["vbench"]["normalized"] == vbench_scores(result["vbench"]["dimensions"])["normalized"]
    assert "quality_score" not in result["vbench"] and "quality_score" in result["vbench"]["missing"]
    assert result["errors"] == [{"video": "c-0.mp4", "evaluator": "pixel", "metric": "error", "error": "cannot decode"}]
    assert result["videos"] == 3
    # Shards: the aggregate of the union does not depend on how rows were split or ordered
    assert aggregate_metrics(rows[::-1]) == result
