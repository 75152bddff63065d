"""Slurm submission with a fake `sbatch` on PATH, and the submitit local launcher for real."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

FAKE_SBATCH = """#!/usr/bin/env bash
# Records its arguments; answers like `sbatch --parsable` with a new job id.
n=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 1 ))
printf '%s\\n' "$*" >> "$SBATCH_LOG"
echo "$((1000 + n))"
"""


@pytest.fixture
def fake_sbatch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_LOG": str(log)}, log


@pytest.mark.slow
def test_submit_chains_generate_evaluate_merge_and_tables(fake_sbatch, tmp_path):
    env, log = fake_sbatch
    sweep = tmp_path / "sweep"
    result = run_cli("stas.slurm", "--shards", 3, "experiment=tiny_paper_main", "hydra.launcher.partition=gpu",
                     "hydra.launcher.account=lab", "hydra.launcher.array_parallelism=2", "hydra.launcher.timeout_min=90",
                     "+hydra.launcher.setup=[module load cuda]", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    assert len(calls) == 6 * 3 + 1
    for cell in range(6):
        gen, ev, mg = calls[3 * cell: 3 * cell + 3]
        ids = [str(1001 + 3 * cell + k) for k in range(3)]
        assert gen[-2].endswith("slurm/generate.sbatch") and "--array=0-2%2" in gen
        assert ev[-2].endswith("slurm/evaluate.sbatch") and f"--dependency=afterok:{ids[0]}" in ev
        assert mg[-2].endswith("slurm/merge.sbatch") and f"--dependency=afterok:{ids[1]}" in mg
        for call in (gen, ev, mg):
            assert "--partition=gpu" in call and "--account=lab" in call and "--time=90" in call
        assert "--gpus-per-node=1" in gen and "--gpus-per-node=1" not in mg  # merging needs no GPU
        run_dir = gen[-1]
        assert run_dir == ev[-1] == mg[-1] and run_dir.startswith(str(sweep))
        overrides = (tmp_path / run_dir / "slurm" / "overrides.txt").read_text().split()
        assert "experiment=tiny_paper_main" in overrides and not any(o.startswith("hydra") for o in overrides)
        assert "module load cuda" in (tmp_path / run_dir / "slurm" / "setup.sh").read_text()
    tables = calls[-1]
    merges = ":".join(str(1003 + 3 * cell) for cell in range(6))
    assert tables[-2].endswith("slurm/tables.sbatch") and f"--dependency=afterok:{merges}" in tables
    dirs = sorted(os.path.basename(c[-1]) for c in calls[:-1:3])
    assert dirs == sorted(f"model={m},steer={s}" for m in ("tiny_wan21", "tiny_cogvideox", "tiny_wan22")
                          for s in ("none", "stas_paper"))
    assert json.loads((sweep / "slurm_submission.json").read_text())["jobs"]["tables"] == "1019"


@pytest.mark.slow
def test_dry_run_prints_and_submits_nothing(fake_sbatch, tmp_path):
    env, log = fake_sbatch
    result = run_cli("stas.slurm", "--dry-run", "--shards", 2, "experiment=tiny_ablation_alpha",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "3 run(s) x 2 shard(s): 10 sbatch submissions (dry run" in result.stdout
    assert result.stdout.count("sbatch --parsable") == 10
    assert "steer.alpha=0.5" in result.stdout
    assert not log.exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_bad_submissions_are_clear(fake_sbatch, tmp_path):
    env, _ = fake_sbatch
    for args, message in [(["--shards", 0, "model=tiny_wan21"], "--shards=0 must be >= 1"),
                          (["shard.index=1"], "shards are set by --shards"),
                          (["model=nope"], "Could not find 'model/nope'"),
                          (["steer.alpha=-1"], "steer.alpha=-1.0 must be > 0")]:
        result = run_cli("stas.slurm", "--dry-run", *args, cwd=tmp_path, env=env)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_submit_without_sbatch_writes_nothing(tmp_path):
    """slurm/submit.sh on a machine without sbatch stops before writing anything into the runs (not after the
    first run's files); --dry-run still works there."""
    path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"])
    if shutil.which("sbatch", path=path):
        pytest.skip("sbatch is installed here")
    env = dict(os.environ, PATH=path, PYTHONPATH=str(REPO))
    sweep = tmp_path / "sweep"
    args = ["bash", str(REPO / "slurm" / "submit.sh"), "experiment=tiny_ablation_alpha", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("stas.slurm: error: sbatch not found on PATH")
    assert not list(tmp_path.iterdir())
    dry = subprocess.run([*args[:2], "--dry-run", *args[2:]], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0 and "sbatch submissions (dry run" in dry.stdout, dry.stderr


def test_sbatch_scripts_are_valid_bash():
    for script in sorted((REPO / "slurm").glob("*.sbatch")) + [REPO / "slurm" / "submit.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_multirun(tmp_path):
    """Each job's output reaches the console; the cells are named by their overrides; a job that fails is shown
    with its error and leaves no directory."""
    sweep = tmp_path / "sweep"
    result = run_cli("stas.run", "-m", "hydra/launcher=local", "steer=none,stas", "prompts.prompts=[a cat]",
                     "model.steps=2", "logger=none", "progress=false", "eval=none", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cells = {steer: sweep / f"model.steps=2,prompts.prompts=[a cat],steer={steer}" for steer in ("none", "stas")}
    for steer, cell in cells.items():
        rows = (cell / "generation.jsonl").read_text().splitlines()
        assert len(rows) == 1 and (cell / json.loads(rows[0])["path"]).is_file()
        assert f"stas.run: tiny_wan21 / steer={steer}: 1 video(s) generated" in result.stdout
        assert f"videos:  {cell / 'videos'}" in result.stdout
    assert result.stdout.index("#0 : steer=none") < result.stdout.index("#1 : steer=stas")
    assert "submitit INFO" not in result.stdout
    assert list((sweep / ".submitit").iterdir()) and not (sweep / ".submitit" / "%j").exists()
    failing = run_cli("stas.run", "-m", "hydra/launcher=local", "prompts.limit=1,0", "model.steps=2", "logger=none",
                      "progress=false", "eval=none", f"hydra.sweep.dir={tmp_path / 'failing'}", cwd=tmp_path)
    assert failing.returncode != 0
    out = failing.stdout
    assert "#0 : prompts.limit=1" in out and "stas.run: tiny_wan21 / steer=stas: 1 video(s) generated" in out
    assert re.search(r"#1 : prompts\.limit=0 .*FAILED\n  stas\.run \(job 1\): error: prompts\.limit=0 must be", out)
    assert sorted(p.name for p in (tmp_path / "failing").iterdir() if not p.name.startswith(".")) == [
        "model.steps=2,prompts.limit=1", "multirun.yaml"]  # the failed cell made nothing: no directory


@pytest.mark.slow
@pytest.mark.parametrize("task_id,shown", [("abc", "'abc'"), ("1.5", "1.5")])
def test_generate_script_refuses_a_non_integer_array_task_id(tmp_path, task_id, shown):
    """The sbatch scripts pass shard.index=$SLURM_ARRAY_TASK_ID explicitly: a value that is no integer is one line
    naming the field, before anything is written."""
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "slurm" / "overrides.txt").write_text("logger=none\nprompts.prompts=[a cat]\n")
    (run_dir / "slurm" / "setup.sh").write_text(f"export STAS_REPO={shlex.quote(str(REPO))}\n")
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=task_id, SLURM_ARRAY_TASK_COUNT="2", PYTHONUNBUFFERED="1")
    result = subprocess.run(["bash", str(REPO / "slurm" / "generate.sbatch"), str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"stas.run: error: shard.index={shown} must be an integer"
    assert sorted(p.name for p in run_dir.iterdir()) == ["slurm"]
