"""Evaluating run directories: stas.run's default evaluation, the stas.evaluate CLI (idempotent, cached per video),
the real VBench per dimension (temporal_flickering runs offline), error rows, sharding, clear messages."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from stas.config import ConfigError, validate
from stas.evaluate import main as evaluate_main
from stas.evaluation import aggregate_metrics, evaluate_run
from stas.evaluation.records import AGGREGATE_FILE, METRICS_FILE
from stas.evaluation.scores import DIMENSIONS
from stas.evaluation.vbench import VBenchRunner
from stas.evaluation.vbench_worker import CACHE_FILES
from stas.rundir import read_jsonl
from stas.video import read_mp4, write_mp4

from conftest import compose, run_cli
from evaluation_helpers import chunky_frames, make_run

FLICKERING = ["eval.evaluators=[pixel,vbench]", "eval.vbench.dimensions=[temporal_flickering]"]


def vbench_temporal_flickering(path):
    """VBench's temporal_flickering of one video, computed here from its definition (mean absolute frame
    difference, 1 - MAE / 255)."""
    frames = read_mp4(path).astype(np.float32)
    return (255.0 - np.mean([np.abs(frames[t] - frames[t + 1]).mean() for t in range(len(frames) - 1)])) / 255.0


def rows_of(path):
    return {(r["video"], r["evaluator"], r["metric"]): r for r in read_jsonl(path)}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python -m stas.run` with the embedded default (tiny model, CPU, offline, eval=default), two short videos,
    an empty VBench cache."""
    tmp = tmp_path_factory.mktemp("default_run")
    run_dir = tmp / "run"
    done = run_cli("stas.run", f"hydra.run.dir={run_dir}", "prompts.limit=2", "model.steps=2", "progress=false",
                   f"eval.vbench.cache_dir={tmp / 'vbench-cache'}", cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


@pytest.mark.slow
def test_stas_run_evaluates_with_what_runs_offline_and_says_what_was_skipped(default_run):
    run_dir, out = default_run
    assert "scored now: pixel 2, vbench/temporal_flickering 2" in out
    assert re.search(r"SKIPPED dino: the weights of DINO ViT-B/16 .* are not available", out)
    assert re.search(r"SKIPPED clip: the weights of CLIP ViT-B/32 .* are not available", out)
    assert re.search(r"SKIPPED vbench/subject_consistency: 3 weight file\(s\) missing from the VBench cache "
                     r"\S*vbench-cache", out)
    for dimension in ("background_consistency", "motion_smoothness", "dynamic_degree", "aesthetic_quality",
                      "imaging_quality"):
        assert f"SKIPPED vbench/{dimension}: " in out
    rows = rows_of(run_dir / METRICS_FILE)
    videos = sorted(p.name for p in (run_dir / "videos").glob("*.mp4"))
    assert len(videos) == 2
    for video in videos:
        for metric in ("consistency", "first_frame_similarity", "intra_chunk_similarity", "cross_chunk_similarity",
                       "chunk_gap"):
            assert rows[(video, "pixel", metric)]["value"] is not None
        flickering = rows[(video, "vbench", "temporal_flickering")]
        assert flickering["value"] == pytest.approx(vbench_temporal_flickering(run_dir / "videos" / video), abs=1e-6)
        assert flickering["prompt"] in video and flickering["seed"] == 0
    aggregate = json.loads((run_dir / AGGREGATE_FILE).read_text())
    assert aggregate["vbench"]["dimensions"]["temporal_flickering"] == pytest.approx(
        np.mean([rows[(v, "vbench", "temporal_flickering")]["value"] for v in videos]))
    assert aggregate["temporal_compression"] == 4
    subject = "\n".join(aggregate["skipped"]["vbench/subject_consistency"])
    assert "dino_model/dino_vitbase16_pretrain.pth" in subject
    assert "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth" in subject
    assert "git clone https://github.com/facebookresearch/dino" in subject
    # W&B (offline): the rows as a table, the aggregate in the summary
    wandb_dir = next((run_dir / "wandb").glob("offline-run-*"))
    table = json.loads(next(wandb_dir.glob("files/media/table/metrics_*.table.json")).read_text())
    assert {"video", "evaluator", "metric", "value"} <= set(table["columns"])
    assert len(table["data"]) == len(rows)
    assert b"eval/vbench/temporal_flickering" in next(wandb_dir.glob("run-*.wandb")).read_bytes()


@pytest.mark.slow
def test_evaluate_cli_is_idempotent_and_caches_per_video(default_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(default_run[0], run_dir)
    before = (run_dir / METRICS_FILE).read_bytes()
    # Every video was scored by stas.run: nothing to do but the aggregate
    again = run_cli("stas.evaluate", run_dir, *FLICKERING, "logger=none", "progress=false", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already scored (cached): pixel 2, vbench/temporal_flickering 2" in again.stdout
    assert "scored now" not in again.stdout
    assert (run_dir / METRICS_FILE).read_bytes() == before
    # Drop one video's rows: only that video is scored again, to the same values
    rows = read_jsonl(run_dir / METRICS_FILE)
    dropped = rows[0]["video"]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows if r["video"] != dropped))
    # With the run's own overrides too, as the Slurm evaluate stage passes them
    third = run_cli("stas.evaluate", run_dir, "prompts.limit=2", "model.steps=2", *FLICKERING, "logger=none",
                    "progress=false", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "scored now: pixel 1, vbench/temporal_flickering 1" in third.stdout
    assert "already scored (cached): pixel 1, vbench/temporal_flickering 1" in third.stdout
    rescored = rows_of(run_dir / METRICS_FILE)
    for row in rows:
        assert rescored[(row["video"], row["evaluator"], row["metric"])]["value"] == pytest.approx(row["value"],
                                                                                                  abs=1e-12)


def test_evaluating_a_fully_scored_run_opens_no_wandb_run(tmp_path, capsys):
    cfg, run_dir = make_run(tmp_path, ["eval.evaluators=[pixel]"])
    args = [str(run_dir), "eval.evaluators=[pixel]", "logger=wandb", "logger.mode=offline", "progress=false"]
    evaluate_main(args)
    assert "scored now: pixel 2" in capsys.readouterr().out
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    before = (run_dir / METRICS_FILE).read_bytes()
    evaluate_main(args)  # exits 0 (returns)
    out = capsys.readouterr().out
    assert out.startswith("stas.evaluate: nothing to evaluate: 2 video(s) already scored (no W&B run opened)\n")
    assert "already scored (cached): pixel 2" in out and "scored now" not in out
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # no second W&B run
    assert (run_dir / METRICS_FILE).read_bytes() == before


@pytest.mark.slow
def test_bad_videos_and_missing_or_broken_vbench_weights_fail_alone(tmp_path):
    cache = tmp_path / "vbench-cache"
    (cache / "amt_model").mkdir(parents=True)
    (cache / "amt_model" / "amt-s.pth").write_bytes(b"not a checkpoint")  # present, so VBench runs it, and fails
    cfg, run_dir = make_run(tmp_path, ["prompts.limit=3", "eval.evaluators=[pixel,vbench]",
                                       f"eval.vbench.cache_dir={cache}", "eval.vbench.dimensions="
                                       "[subject_consistency,motion_smoothness,temporal_flickering]"])
    videos = sorted((run_dir / "videos").glob("*.mp4"))
    good, corrupt, single = ([v for v in videos if word in v.name] for word in ("fox", "waves", "chef"))
    corrupt[0].write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    write_mp4(chunky_frames(5, frames=1), single[0], 8, run_dir / ".partial")
    summary = evaluate_run(cfg, run_dir)
    assert summary.scored == {"pixel": 1, "vbench/temporal_flickering": 1}
    # The two bad videos get an error row from every scorer that wanted them, motion_smoothness included
    assert summary.errors == {"pixel": 2, "vbench/motion_smoothness": 2, "vbench/temporal_flickering": 2}
    assert summary.skipped["vbench/subject_consistency"].startswith(
        f"3 weight file(s) missing from the VBench cache {cache}")
    assert str(cache / "dino_model" / "dino_vitbase16_pretrain.pth") in summary.skipped["vbench/subject_consistency"]
    assert summary.skipped["vbench/motion_smoothness"].startswith("VBench failed: ")
    assert (run_dir / "vbench" / "motion_smoothness.log").is_file()
    rows = rows_of(run_dir / METRICS_FILE)
    assert rows[(good[0].name, "vbench", "temporal_flickering")]["value"] == pytest.approx(
        vbench_temporal_flickering(good[0]), abs=1e-6)
    assert rows[(corrupt[0].name, "pixel", "error")]["error"].startswith("cannot decode")
    assert rows[(corrupt[0].name, "vbench", "temporal_flickering")]["value"] is None
    assert "has 1 frame" in rows[(single[0].name, "pixel", "error")]["error"]
    aggregate = json.loads((run_dir / AGGREGATE_FILE).read_text())
    assert len(aggregate["errors"]) == 6 and aggregate["metrics"]["pixel/consistency"]["count"] == 1
    # A repaired video is scored on the next run, its error row goes; the good one stays cached
    write_mp4(chunky_frames(6), corrupt[0], 8, run_dir / ".partial")
    cfg.eval.evaluators = ["pixel"]
    summary = evaluate_run(cfg, run_dir)
    assert summary.scored == {"pixel": 1} and summary.cached == {"pixel": 1} and summary.errors == {"pixel": 1}
    rows = rows_of(run_dir / METRICS_FILE)
    assert (corrupt[0].name, "pixel", "error") not in rows
    assert rows[(corrupt[0].name, "pixel", "consistency")]["value"] is not None


@pytest.mark.slow
def test_vbench_standard_mode_scores_the_suites_names(tmp_path):
    cfg, run_dir = make_run(tmp_path, ["prompts=vbench", "prompts.vbench_dimensions=[temporal_flickering]",
                                       "prompts.limit=1", "prompts.samples_per_prompt=2", *FLICKERING,
                                       "eval.vbench.mode=vbench_standard"])
    assert sorted(p.name for p in (run_dir / "videos").glob("*.mp4")) == [
        "In a still frame, a stop sign-0.mp4", "In a still frame, a stop sign-1.mp4"]
    summary = evaluate_run(cfg, run_dir)
    assert summary.scored == {"pixel": 2, "vbench/temporal_flickering": 2}
    # Demo prompts are not VBench's: standard mode has nothing to score, and says so
    cfg, run_dir = make_run(tmp_path, [*FLICKERING, "eval.vbench.mode=vbench_standard"], name="demo")
    summary = evaluate_run(cfg, run_dir)
    assert "vbench/temporal_flickering" not in summary.scored
    assert any("none of this run's videos is in VBench's standard suite" in note for note in summary.notes)


def test_chunk_metrics_follow_the_models_temporal_compression(tmp_path):
    cfg, run_dir = make_run(tmp_path, ["eval.evaluators=[pixel]"])
    aggregate = evaluate_run(cfg, run_dir).aggregate["metrics"]
    # chunky_frames jump exactly at the VAE's latent chunk boundaries (compression 4)
    assert aggregate["pixel/intra_chunk_similarity"]["mean"] > 0.95
    assert aggregate["pixel/cross_chunk_similarity"]["mean"] < 0.3
    assert aggregate["pixel/chunk_gap"]["mean"] > 0.6
    cfg.eval.temporal_compression = 8  # now half the jumps fall inside a chunk; rows of other settings are redone
    summary = evaluate_run(cfg, run_dir)
    assert summary.scored == {"pixel": 2} and not summary.cached
    aggregate = summary.aggregate["metrics"]
    assert aggregate["pixel/intra_chunk_similarity"]["mean"] < 0.9
    assert aggregate["pixel/intra_chunk_similarity"]["count"] == 2
    assert {row["settings"] for row in read_jsonl(run_dir / METRICS_FILE)} == {
        "pixel size 32; temporal_compression 8"}
    assert evaluate_run(cfg, run_dir).cached == {"pixel": 2}


def test_sharded_rows_merge_into_the_unsharded_aggregate(tmp_path):
    cfg, run_dir = make_run(tmp_path, ["prompts.limit=3", "eval.evaluators=[pixel]"], name="whole")
    whole = evaluate_run(cfg, run_dir).aggregate
    cfg, run_dir = make_run(tmp_path, ["prompts.limit=3", "eval.evaluators=[pixel]"], name="sharded")
    union = []
    for index in range(2):
        cfg.shard.index, cfg.shard.count = index, 2
        summary = evaluate_run(cfg, run_dir)
        assert summary.videos == (2 if index == 0 else 1) and summary.aggregate_path is None
        assert summary.scored == {"pixel": summary.videos}
        union += read_jsonl(run_dir / "shards" / f"metrics-{index:03d}-of-002.jsonl")
    assert not (run_dir / AGGREGATE_FILE).exists()
    merged = aggregate_metrics(union)
    assert merged["videos"] == whole["videos"] == 3
    for name, entry in whole["metrics"].items():
        assert merged["metrics"][name] == pytest.approx(entry)
    # Unsharded now: the shards' rows count as done, and metrics.json aggregates them all
    cfg.shard.index, cfg.shard.count = None, 1
    summary = evaluate_run(cfg, run_dir)
    assert summary.scored == {} and summary.cached == {"pixel": 3}
    written = json.loads((run_dir / AGGREGATE_FILE).read_text())["metrics"]
    assert written.keys() == whole["metrics"].keys()
    for name, entry in whole["metrics"].items():
        assert written[name] == pytest.approx(entry)


def test_vbench_worker_in_another_interpreter_and_its_catalogue(tmp_path):
    assert set(CACHE_FILES) == set(DIMENSIONS)
    # An interpreter without vbench: every dimension is skipped with the reason
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    cfg, run_dir = make_run(tmp_path, ["eval.evaluators=[pixel,vbench]",
                                       "eval.vbench.dimensions=[temporal_flickering,subject_consistency]",
                                       f"eval.vbench.python={tmp_path / 'venv' / 'bin' / 'python'}"])
    summary = evaluate_run(cfg, run_dir)
    assert summary.scored == {"pixel": 2}
    assert list(summary.skipped) == ["vbench"]  # said once, not once per dimension
    assert re.match(r"all 2 dimension\(s\): vbench is not installed in \S*venv/bin/python: pip install --no-deps "
                    r"vbench==0\.1\.5", summary.skipped["vbench"])
    assert str(summary).count("vbench is not installed") == 1
    # Every file the probe asks for, once placed, satisfies it
    cache = tmp_path / "cache"
    for relative, _ in CACHE_FILES["subject_consistency"]:
        (cache / relative).parent.mkdir(parents=True, exist_ok=True)
        (cache / relative).write_bytes(b"")
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "dino_vitbase16_pretrain.pth").write_bytes(b"")
    options = compose(["eval.vbench.cache_dir=" + str(cache)]).eval.vbench
    runner = VBenchRunner(options, "cpu", tmp_path / "logs")
    runner.env["TORCH_HOME"] = str(tmp_path / "torch")
    assert runner.probe(["subject_consistency", "temporal_flickering"]) == {"subject_consistency": None,
                                                                            "temporal_flickering": None}


@pytest.mark.parametrize("overrides, message", [
    (["eval.vbench.dimensions=[temporal_flicker]"],
     r"eval\.vbench\.dimensions contains 'temporal_flicker', which is not a VBench dimension; allowed: "
     r"subject_consistency, .*overall_consistency"),
    (["eval.vbench.dimensions=[color]"], r"'color', which VBench scores only on its own prompts: use "
                                         r"eval\.vbench\.mode=vbench_standard"),
    (["eval.evaluators=[pixel,fvd]"], r"eval\.evaluators='fvd' is not allowed; allowed: pixel, dino, clip, vbench"),
    (["eval.vbench.python=/nowhere/python"], r"eval\.vbench\.python='/nowhere/python': no such executable"),
    (["eval.vbench.dimensions=[]"], r"eval\.vbench\.dimensions is empty"),
    (["eval.temporal_compression=0"], r"eval\.temporal_compression=0 must be an integer in \[1, 64\]"),
])
def test_eval_config_errors_name_field_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["logger=none", *overrides]))


def test_evaluate_cli_errors_are_one_clear_line(tmp_path, capsys):
    def fails(*args):
        with pytest.raises(SystemExit) as caught:
            evaluate_main([str(a) for a in args])
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("stas.evaluate: error: ")
        return err

    assert "no such directory" in fails(tmp_path / "missing")
    assert "is not a stas run directory (no run_identity.yaml" in fails(tmp_path)
    cfg, run_dir = make_run(tmp_path)
    shutil.rmtree(run_dir / "videos")
    assert "holds none of the 2 video(s) of this run" in fails(run_dir, "logger=none")
    assert "which is not a VBench dimension" in fails(run_dir, "eval.vbench.dimensions=[motion]")
    assert re.search(r"holds a run of another config than these overrides give; differing keys: .*model\.name: "
                     r"run='tiny_wan21', here='tiny_cogvideox'", fails(run_dir, "model=tiny_cogvideox"))
    assert ("Could not find 'eval/nonsense'. Available options in 'eval': default, none, vbench_standard\n"
            in fails(run_dir, "eval=nonsense"))
    assert "give exactly one run directory" in fails()
    assert "eval.evaluators is empty" in fails(run_dir, "eval=none")


def legacy_identity(identity: dict, ratio: float) -> dict:
    """What run_identity.yaml held before the `detect` group: steer.ratio / steer.max_dims, no steer.reference."""
    steer = {key: value for key, value in identity["steer"].items() if key != "reference"}
    return {**{key: value for key, value in identity.items() if key != "detect"},
            "steer": {**steer, "ratio": ratio, "max_dims": 4}}


def test_runs_from_before_the_detect_group_are_evaluated_with_their_detection(tmp_path):
    import yaml

    from stas.evaluate import evaluation_config
    from stas.rundir import identity

    run_dir = tmp_path / "old"
    (run_dir / ".hydra").mkdir(parents=True)
    recorded = legacy_identity(identity(compose(["model.steps=2"])), ratio=5.0)
    (run_dir / "run_identity.yaml").write_text(yaml.safe_dump(recorded))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.steps=2", "steer.ratio=5"]))
    cfg = evaluation_config(run_dir, ["eval=default"])
    assert (cfg.detect.rule, cfg.detect.ratio, cfg.detect.max_dims) == ("channel_peak", 5.0, 4)
    assert cfg.steer.reference == "steered" and cfg.model.steps == 2
    # the translation covers the detection only: a run of another config is still refused
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.steps=3"]))
    with pytest.raises(ConfigError, match=r"differing keys: model.steps: run=2, here=3"):
        evaluation_config(run_dir, ["eval=default"])
