"""The chunk-boundary similarity figure: per-pair frame similarity (stas.evaluation.similarity), the library that pairs
two runs' videos (stas.evaluation.chunk_similarity) and the script analysis/chunk_similarity.py on run directories."""

from __future__ import annotations

import csv
import importlib.util
import json

import matplotlib.image
import numpy as np
import pytest
import torch

from stas.evaluation.chunk_similarity import CSV_COLUMNS, band, chunk_similarity, feature_extractor
from stas.evaluation.features import pixel_features
from stas.evaluation.similarity import cross_chunk, frame_pair_similarity
from stas.rundir import read_manifest

from conftest import REPO, compose
from evaluation_helpers import chunky_frames, make_run


def script_main():
    spec = importlib.util.spec_from_file_location("chunk_similarity_script", REPO / "analysis" / "chunk_similarity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def drifting_video(frames: int = 17, cut_at: int | None = None, seed: int = 0) -> np.ndarray:
    """A random texture of 8-pixel blocks panning one pixel per frame (64 x 128); with `cut_at`, frames from there on
    show another texture (a scene cut between frames cut_at - 1 and cut_at)."""
    rng = np.random.default_rng(seed)
    textures = [rng.uniform(0, 255, (8, 16 + frames // 8 + 1, 3)).repeat(8, 0).repeat(8, 1) for _ in range(2)]
    video = [textures[int(cut_at is not None and t >= cut_at)][:, t:t + 128] for t in range(frames)]
    return np.stack(video).astype(np.uint8)


def pixel_similarity(video: np.ndarray) -> torch.Tensor:
    frames = torch.from_numpy(video).permute(0, 3, 1, 2).float()
    return frame_pair_similarity(pixel_features(16)(frames))


def test_cross_chunk_pairs_follow_the_vae_chunking():
    flags = cross_chunk(17, 4)
    assert len(flags) == 16
    assert [t for t, crosses in enumerate(flags) if crosses] == [0, 4, 8, 12]
    assert [t for t, crosses in enumerate(cross_chunk(9, 2)) if crosses] == [0, 2, 4, 6]


def test_a_cut_at_a_chunk_boundary_is_the_least_similar_pair():
    similarity = pixel_similarity(drifting_video(cut_at=5))  # frames 4 | 5: the boundary of chunks 1 and 2
    assert similarity.shape == (16,)
    assert int(similarity.argmin()) == 4 and cross_chunk(17, 4)[4]
    others = torch.cat([similarity[:4], similarity[5:]])
    assert float(similarity[4]) < float(others.min()) - 0.3


def test_a_video_without_cuts_has_no_dip():
    similarity = pixel_similarity(drifting_video())
    assert float(similarity.max() - similarity.min()) < 0.1
    assert float(similarity.min()) > 0.5


def test_frame_pair_similarity_is_the_cosine_of_consecutive_frames():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    assert frame_pair_similarity(features).tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="T >= 2"):
        frame_pair_similarity(torch.ones(1, 3))


def test_band_min_max_and_bootstrap():
    values = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    mean, low, high = band(values, "minmax")
    assert mean.tolist() == [1.0, 1.0] and low.tolist() == [0.0, 1.0] and high.tolist() == [2.0, 1.0]
    mean, low, high = band(values, "bootstrap", resamples=500)
    assert 0.0 <= low[0] < 1.0 < high[0] <= 2.0
    assert low[1] == high[1] == 1.0  # nothing varies, nothing to resample


@pytest.fixture
def two_runs(tmp_path):
    """A vanilla run whose videos jump at every latent-chunk boundary and a steered run whose videos pan smoothly,
    of the same prompts and seeds (run directories as stas.run leaves them)."""
    _, vanilla = make_run(tmp_path, ["steer=none"], frames=chunky_frames, name="vanilla")
    _, steered = make_run(tmp_path, ["steer=stas"], frames=lambda seed: drifting_video(seed=seed)[:, :64, :96],
                          name="steered")
    return vanilla, steered


def test_script_writes_the_figure_and_the_csv(two_runs, tmp_path, capsys):
    vanilla, steered = two_runs
    out = tmp_path / "figure"
    assert script_main()([str(vanilla), str(steered), "--out", str(out), "--band", "minmax"]) == 0
    printed = capsys.readouterr().out
    assert "pixel features, 2 video pair(s), temporal compression 4" in printed
    assert "vanilla" in printed and "steered (stas)" in printed
    image = matplotlib.image.imread(out / "chunk_similarity.png")
    assert image.shape[0] > 300 and image[..., :3].std() > 0.05
    with open(out / "chunk_similarity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 2 * 2 * 16  # runs x videos x frame pairs
    assert {row["label"] for row in rows} == {"vanilla", "steered (stas)"}
    crossing = sorted({int(row["frame"]) for row in rows if row["cross_chunk"] == "1"})
    assert crossing == [0, 4, 8, 12]
    assert all(int(row["next_chunk"]) == int(row["chunk"]) + int(row["cross_chunk"]) for row in rows)

    def mean(label, cross):
        return np.mean([float(r["similarity"]) for r in rows if r["label"] == label and r["cross_chunk"] == cross])

    # the chunky vanilla videos change only across chunk boundaries, the steered ones evenly
    assert mean("vanilla", "1") < mean("vanilla", "0") - 0.3
    assert abs(mean("steered (stas)", "1") - mean("steered (stas)", "0")) < 0.1


def test_chunk_similarity_pairs_videos_by_prompt_and_seed(two_runs):
    vanilla, steered = two_runs
    result = chunk_similarity(vanilla, steered, feature_extractor("pixel", device="cpu"), "pixel", limit=1)
    first = read_manifest(vanilla)[0]
    assert result.keys == [(first["prompt"], first["seed"])]  # run a's first video
    assert result.a.shape == result.b.shape == (1, 16)
    assert result.temporal_compression == 4  # tiny_wan21's VAE, from the backbone registry


def rewrite_manifest(run, change):
    path = run / "items.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(row)) + "\n" for row in rows))


@pytest.mark.parametrize("case", ["not_a_run", "a_file", "no_shared_videos", "no_videos", "identity_list",
                                  "path_out_of_videos", "unknown_model", "out_is_a_file"])
def test_script_refuses_what_is_not_a_pair_of_runs(two_runs, tmp_path, capsys, case):
    vanilla, steered = two_runs
    if case == "identity_list":
        (steered / "run_identity.yaml").write_text("- model\n- steer\n")
        args, expected = [vanilla, steered], "run_identity.yaml holds a list, not the mapping of config keys"
    elif case == "path_out_of_videos":
        rewrite_manifest(vanilla, lambda row: dict(row, file="../../etc/passwd"))
        args, expected = [vanilla, steered], "is not a plain file name (no folders, no '..')"
    elif case == "unknown_model":
        identity = (vanilla / "run_identity.yaml").read_text().replace("name: tiny_wan21", "name: my_model")
        (vanilla / "run_identity.yaml").write_text(identity)
        args, expected = [vanilla, steered], "model.name='my_model': model='my_model' is not an option"
    elif case == "out_is_a_file":
        (tmp_path / "out").write_text("my notes")
        args, expected = [vanilla, steered], "the output directory is a file"
    elif case == "not_a_run":
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "notes.txt").write_text("not a run")
        args, expected = [tmp_path / "plain", steered], "is not a stas run directory (no run_identity.yaml"
    elif case == "a_file":
        args, expected = [vanilla, tmp_path / "plain.txt"], "plain.txt is not a directory"
        (tmp_path / "plain.txt").write_text("")
    elif case == "no_shared_videos":
        _, other = make_run(tmp_path, ["steer=none", "prompts.prompts=[a red fox]"], name="other")
        args, expected = [other, steered], "share no generated video of the same prompt and seed"
    else:
        for video in (steered / "videos").glob("*.mp4"):
            video.unlink()
        args, expected = [vanilla, steered], "holds none of its videos yet"
    assert script_main()([*map(str, args), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chunk_similarity: error: ") and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "chunk_similarity.png").exists()


@pytest.mark.slow
def test_script_on_two_generated_tiny_runs_with_dino(tmp_path, capsys):
    """Two real runs of the tiny Wan twin (python -m stas.run in-process), vanilla and STAS, DINO features with
    random weights (the flag the evaluators' tests use)."""
    from stas.run import run

    runs = []
    for steer in ("none", "stas"):
        cfg = compose(["logger=none", "progress=false", "eval=none", "model.steps=2", "model.num_frames=9",
                       "prompts.limit=1", f"steer={steer}"])
        run(cfg, tmp_path / steer)
        runs.append(tmp_path / steer)
    out = tmp_path / "out"
    assert script_main()([*map(str, runs), "--out", str(out), "--features", "dino", "--random-weights",
                          "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "dino features, 1 video pair(s), temporal compression 4; RANDOM weights" in printed
    with open(out / "chunk_similarity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 8 and {row["features"] for row in rows} == {"dino"}
    assert all(-1.0 <= float(row["similarity"]) <= 1.0 for row in rows)
    assert matplotlib.image.imread(out / "chunk_similarity.png")[..., :3].std() > 0.05
