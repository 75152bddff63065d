"""Stub run directories: a run that fails before making anything of its own leaves no directory; anything with a
video, a record, a file someone put there or another live process of the run is kept; readers skip stubs and say so;
a finished run leaves no empty .partial/ or log; a sweep whose cells fail keeps its multirun.yaml."""

import json
import os

import pytest
import yaml

from stas.rundir import RunDirGuard, has_outputs, run_dirs_below
from stas.rundir.cleanup import remove_empty_parents

from conftest import run_cli

LOG = "run.log"


def hydra_start(run_dir):
    """What Hydra writes into a job's directory before stas runs."""
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text("{}\n")
    return run_dir


def failed_before_any_video(run_dir):
    """What stas writes before its first video: the identity and manifest, .hydra/held, empty videos/ and .partial/,
    the W&B folder of the attempt."""
    (run_dir / "run_identity.yaml").write_text("model: {name: m}\n")
    (run_dir / "items.jsonl").write_text('{"key": "a"}\n')
    (run_dir / ".hydra" / "held").mkdir()
    (run_dir / ".hydra" / "held" / "config.yaml").write_text("{}\n")
    (run_dir / "videos").mkdir()
    (run_dir / ".partial").mkdir()
    wandb = run_dir / "wandb" / "offline-run-20260101_000000-abc"
    (wandb / "files").mkdir(parents=True)
    (wandb / "files" / "config.yaml").write_text("x: 1\n")
    (run_dir / "wandb" / "latest-run").symlink_to(wandb.name)
    (run_dir / "wandb" / "debug.log").symlink_to(f"{wandb.name}/files/config.yaml")


def test_a_stub_this_process_made_alone_is_removed(tmp_path):
    run_dir = hydra_start(tmp_path / "run")
    (run_dir / LOG).write_text("")
    guard = RunDirGuard(run_dir, LOG)
    failed_before_any_video(run_dir)
    assert guard.remove_if_stub() and not run_dir.exists()
    guard.close()


@pytest.mark.parametrize("what,make", [
    ("a video", lambda d: (d / "videos" / "a cat-0.mp4").write_bytes(b"mp4")),
    ("a record", lambda d: (d / "generation.jsonl").write_text('{"key": "a"}\n')),
    ("a shard's record", lambda d: (d / "shards").mkdir() or (d / "shards" / "metrics-000-of-002.jsonl").write_text("")),
    ("a file someone put there", lambda d: (d / "notes.txt").write_text("my notes")),
    ("a file in .hydra", lambda d: (d / ".hydra" / "mine.yaml").write_text("")),
    ("a claim being written", lambda d: (d / ".partial" / "a cat-0.mp4").write_bytes(b"")),
    ("a log with content", lambda d: (d / LOG).write_text("WARNING something\n")),
    ("an analysis output", lambda d: (d / "ma_stats.pt").write_bytes(b"")),
    ("a link in wandb/ to elsewhere", lambda d: (d / "wandb" / "elsewhere").symlink_to("/")),
])
def test_a_directory_holding_anything_of_a_runs_own_is_kept(tmp_path, what, make):
    run_dir = hydra_start(tmp_path / "run")
    guard = RunDirGuard(run_dir, LOG)
    failed_before_any_video(run_dir)
    make(run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert not guard.remove_if_stub(), what
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    guard.close()


def test_a_directory_that_held_a_run_before_is_kept(tmp_path):
    run_dir = hydra_start(tmp_path / "run")
    failed_before_any_video(run_dir)  # an earlier attempt's files, there before this process started
    guard = RunDirGuard(run_dir, LOG)
    assert not guard.fresh and not guard.remove_if_stub() and run_dir.is_dir()
    guard.close()
    empty_made_by_the_user = hydra_start(tmp_path / "mine")
    guard = RunDirGuard(empty_made_by_the_user, LOG, made_here=False)
    assert not guard.remove_if_stub() and empty_made_by_the_user.is_dir()
    guard.close()


def test_a_directory_another_process_of_the_run_works_in_is_kept(tmp_path):
    run_dir = hydra_start(tmp_path / "run")
    failing, other = RunDirGuard(run_dir, LOG), RunDirGuard(run_dir, LOG)  # two processes (two open files: two locks)
    failed_before_any_video(run_dir)
    assert not failing.remove_if_stub() and run_dir.is_dir()
    other.close()
    failing.close()
    last = RunDirGuard(hydra_start(tmp_path / "again"), LOG)
    assert last.remove_if_stub()  # alone: removed
    last.close()


def test_only_the_empty_folders_made_for_the_run_go(tmp_path):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "keep.txt").write_text("")
    run_dir = tmp_path / "runs" / "tiny_wan21" / "stas" / "2026-01-01_00-00-00"
    run_dir.mkdir(parents=True)
    run_dir.rmdir()
    remove_empty_parents(run_dir, tmp_path / "runs" / "tiny_wan21")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine"]


def test_readers_skip_run_directories_without_output(tmp_path):
    stub = hydra_start(tmp_path / "sweep" / "0")
    failed_before_any_video(stub)
    scored = tmp_path / "sweep" / "1"
    scored.mkdir()
    (scored / "run_identity.yaml").write_text("{}\n")
    (scored / "metrics.jsonl").write_text("")
    assert not has_outputs(stub) and has_outputs(scored)
    skipped = []
    assert run_dirs_below(tmp_path / "sweep", skipped) == [scored] and skipped == [stub]


@pytest.mark.slow
def test_failed_runs_leave_nothing_and_finished_ones_no_empty_leftovers(tmp_path):
    """A new user's first runs: one that fails at start-up (here a prompt file that does not exist) leaves no
    folder at all; one that finishes leaves no empty .partial/ and no empty log, under runs/<model>/<steer>/<time>."""
    failed = run_cli("stas.run", "prompts=file", f"prompts.path={tmp_path / 'nowhere.txt'}", "logger=none",
                     cwd=tmp_path)
    assert failed.returncode == 2 and failed.stderr.startswith("stas.run: error: prompts.path=")
    assert len(failed.stderr.splitlines()) == 1  # still one line
    assert not list(tmp_path.iterdir())  # no runs/tiny_wan21/stas/<time>, no runs/
    # Into a directory that holds a file of the user's: that directory stays
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    failed = run_cli("stas.run", "prompts=file", f"prompts.path={tmp_path / 'nowhere.txt'}", "logger=none",
                     f"hydra.run.dir={mine}", cwd=tmp_path)
    assert failed.returncode == 2 and (mine / "notes.txt").read_text() == "keep me"
    done = run_cli("stas.run", "prompts.limit=1", "model.steps=2", "logger=none", "eval=none", "progress=false",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs" / "tiny_wan21" / "stas").iterdir()
    names = sorted(p.name for p in run_dir.iterdir())
    assert ".partial" not in names and not [n for n in names if n.endswith(".log")], names
    assert json.loads((run_dir / "generation.jsonl").read_text().splitlines()[0])["steer"] == "stas"
    assert yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["name"] == "run"
    assert os.listdir(run_dir / "videos")


@pytest.mark.slow
def test_a_sweep_whose_first_cell_fails_keeps_its_multirun_yaml(tmp_path):
    """A real 2-cell multirun whose first cell fails validation: one line naming the job and the value, exit 2, the
    failed cell leaves no directory, and the sweep's record (multirun.yaml, written before any job) stays."""
    sweep = tmp_path / "sweep"
    result = run_cli("stas.run", "-m", "model.steps=0,2", "prompts.limit=1", "logger=none", "eval=none",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "stas.run (job 0): error: model.steps=0 must be an integer in [1, 10000]"
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]
    recorded = yaml.safe_load((sweep / "multirun.yaml").read_text())
    assert "model.steps=0,2" in recorded["hydra"]["overrides"]["task"]
