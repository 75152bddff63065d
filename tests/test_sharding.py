"""Sharding, merge and kill-and-resume: shards of a run add up to exactly the unsharded run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stas.errors import UserError
from stas.merge import merge
from stas.rundir import read_jsonl

from conftest import REPO, compose, run_cli
from test_generation import gen

PROMPTS = "prompts.prompts=[a cat,a dog,a bird,a fish,a horse]"


def comparable(run_dir):
    """generation.jsonl without timings, and every video's bytes."""
    rows = read_jsonl(run_dir / "generation.jsonl")
    return ([{k: v for k, v in r.items() if k != "seconds"} for r in rows],
            {r["path"]: (run_dir / r["path"]).read_bytes() for r in rows})


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unsharded")
    gen(run_dir, PROMPTS, "model.steps=2")
    return run_dir


@pytest.mark.slow
def test_three_shards_in_one_directory_equal_the_unsharded_run(unsharded, tmp_path):
    for index in range(3):
        summary = gen(tmp_path, PROMPTS, "model.steps=2", f"shard.index={index}", "shard.count=3")
        assert summary.generated == len(range(index, 5, 3))  # every third item
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        f"generation-00{i}-of-003.jsonl" for i in range(3)]
    report = merge(tmp_path)
    assert report.complete and report.present == 5
    assert comparable(tmp_path) == comparable(unsharded)


@pytest.mark.slow
def test_shards_in_separate_directories_merge_into_the_target(unsharded, tmp_path):
    dirs = [tmp_path / f"shard{i}" for i in range(3)]
    for index, run_dir in enumerate(dirs):
        gen(run_dir, PROMPTS, "model.steps=2", f"shard.index={index}", "shard.count=3")
    report = merge(dirs[0], dirs[1:])
    assert report.complete and report.copied == 3
    assert comparable(dirs[0]) == comparable(unsharded)


@pytest.mark.slow
def test_incomplete_merge_names_what_is_missing(tmp_path):
    for index in (0, 2):
        gen(tmp_path, PROMPTS, "model.steps=2", f"shard.index={index}", "shard.count=3")
    result = run_cli("stas.merge", tmp_path, cwd=tmp_path)
    assert result.returncode == 3
    assert "3/5 videos" in result.stdout and "INCOMPLETE: 2 item(s) missing" in result.stdout
    assert "'a dog' sample 0" in result.stdout and "'a horse' sample 0" in result.stdout
    assert json.loads((tmp_path / "merge_report.json").read_text())["complete"] is False
    # the missing shard re-run completes the run
    gen(tmp_path, PROMPTS, "model.steps=2", "shard.index=1", "shard.count=3")
    assert merge(tmp_path).complete


@pytest.mark.slow
def test_merging_different_configs_is_refused_naming_the_keys(tmp_path):
    gen(tmp_path / "a", PROMPTS, "model.steps=2")
    gen(tmp_path / "b", PROMPTS, "model.steps=3", "steer.alpha=2.0")
    with pytest.raises(UserError, match=r"Differing keys: model.steps: target=2, source=3; steer.alpha"):
        merge(tmp_path / "a", [tmp_path / "b"])
    result = run_cli("stas.merge", tmp_path / "a", tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "is not a stas run directory" in result.stderr


@pytest.mark.slow
def test_kill_and_resume_leaves_no_duplicate_or_corrupt_file(unsharded, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "stas.run", PROMPTS, "model.steps=2", "logger=none", "progress=false", "eval=none",
            f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run_dir / "videos").glob("*.mp4"))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # mid-run: between or inside a video's writes
    process.wait()
    assert len(read_jsonl(run_dir / "generation.jsonl")) < 5
    resumed = run_cli("stas.run", PROMPTS, "model.steps=2", "logger=none", "progress=false", "eval=none",
                      f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(run_dir) == comparable(unsharded)
    assert sorted(p.name for p in (run_dir / "videos").iterdir()) == sorted(
        p.name for p in (unsharded / "videos").iterdir())
    lines = (run_dir / "generation.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)


def test_only_explicit_shard_values_shard_a_run(monkeypatch):
    """Under a Slurm launcher the array variables number the sweep's cells: they must not shard each cell."""
    from stas.core.selection import shard_of

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert shard_of(compose([]).shard) == (0, 1)
    assert shard_of(compose(["shard.index=2", "shard.count=4"]).shard) == (2, 4)
