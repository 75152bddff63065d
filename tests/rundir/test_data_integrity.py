"""Run directories keep their data whole: a full disk leaves no torn video, a torn video is made (and scored)
again, prompts with any line separator survive the JSON-lines files, and processes started at once into one
run directory neither mix configs nor make a video twice."""

import json
import os
import re
import subprocess
import sys

import pytest

from stas.evaluation import evaluate_run
from stas.evaluation.records import METRICS_FILE
from stas.generation import PARTIAL_DIR, VIDEOS_DIR, generation_rows
from stas.rundir import JsonlRecords, atomic_write_jsonl, load_identity, read_jsonl, record_files
from stas.video import read_mp4, write_mp4

from conftest import REPO, run_cli
from evaluation_helpers import chunky_frames, make_run
from test_generation import gen

RUN = ["model.steps=2", "logger=none", "progress=false", "eval=none"]
PROMPTS = "prompts.prompts=[a cat,a dog]"
# Every character str.splitlines() splits on; JSON escapes the ASCII ones but writes \x85, \u2028, \u2029 raw.
SEPARATORS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def start_cli(module, *args, cwd):
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def finish(processes):
    """(returncode, stdout, stderr) of every process, in order."""
    outputs = [process.communicate(timeout=600) for process in processes]
    return [(process.returncode, *output) for process, output in zip(processes, outputs)]


def generated(stdout: str) -> int:
    return int(re.search(r"(\d+) video\(s\) generated", stdout).group(1))


# ---- JSON lines and line separators


def test_json_lines_round_trip_every_unicode_line_separator(tmp_path):
    assert all(len(f"a{separator}b".splitlines()) == 2 for separator in SEPARATORS)
    rows = [{"key": str(n), "prompt": f"a{separator}b"} for n, separator in enumerate(SEPARATORS)]
    atomic_write_jsonl(tmp_path / "written.jsonl", rows)
    assert read_jsonl(tmp_path / "written.jsonl") == rows
    records = JsonlRecords(tmp_path / "appended.jsonl", key=lambda row: row["key"])
    for row in rows:
        records.append(row)
    reopened = JsonlRecords(tmp_path / "appended.jsonl", key=lambda row: row["key"])
    assert list(reopened.rows.values()) == rows
    assert read_jsonl(tmp_path / "appended.jsonl") == rows
    assert (tmp_path / "appended.jsonl").read_bytes().count(b"\n") == len(rows)


@pytest.mark.slow
def test_prompts_with_line_separators_rerun_evaluate_and_merge(tmp_path):
    prompts = ["a\u2028cat", "a\x85dog", "a\u2029fish"]
    run_dir = tmp_path / "run"
    args = ["prompts.prompts=[" + ",".join(f"'{p}'" for p in prompts) + "]", *RUN, f"hydra.run.dir={run_dir}"]
    first = run_cli("stas.run", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_cli("stas.run", *args, cwd=tmp_path)  # the run directory accepts its own rerun
    assert again.returncode == 0, again.stderr
    assert "0 video(s) generated, 3 already complete" in again.stdout
    scored = run_cli("stas.evaluate", run_dir, "eval.evaluators=[pixel]", "logger=none", "progress=false",
                     cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert "evaluation of 3 video(s)" in scored.stdout and "scored now: pixel 3" in scored.stdout
    merged = run_cli("stas.merge", run_dir, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert [row["prompt"] for row in read_jsonl(run_dir / "generation.jsonl")] == prompts
    assert {row["prompt"] for row in read_jsonl(run_dir / METRICS_FILE)} == set(prompts)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_metric_is_recorded_as_not_scored_and_files_stay_json(tmp_path, value):
    """JSON has no NaN: a non-finite metric becomes an error row (tried again later), and no writer emits one."""
    from stas.evaluation.records import Video, aggregate_metrics, metric_row

    row = metric_row(Video("a-0.mp4", tmp_path / "a-0.mp4", "a", 0), "vbench", "aesthetic_quality", value)
    assert row["value"] is None and "non-finite aesthetic_quality" in row["error"]
    atomic_write_jsonl(tmp_path / "metrics.jsonl", [row])
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == row
    assert aggregate_metrics([row])["errors"][0]["video"] == "a-0.mp4"
    finite = metric_row(Video("a-0.mp4", tmp_path / "a-0.mp4", "a", 0), "vbench", "aesthetic_quality", 0.5)
    assert finite["value"] == 0.5 and "error" not in finite
    with pytest.raises(ValueError):
        atomic_write_jsonl(tmp_path / "bad.jsonl", [{"value": value}])
    assert not (tmp_path / "bad.jsonl").exists()


def test_an_append_after_a_line_torn_by_a_killed_writer_is_kept(tmp_path):
    path = tmp_path / "rows.jsonl"
    records = JsonlRecords(path, key=lambda row: row["key"])
    records.append({"key": "a"})
    with open(path, "a") as handle:  # another writer of the file, killed in the middle of its line
        handle.write('{"key": "b", "pro')
    records.append({"key": "c"})
    assert read_jsonl(path) == [{"key": "a"}, {"key": "c"}]


def test_a_rewrite_keeps_the_rows_another_writer_appended(tmp_path):
    path = tmp_path / "rows.jsonl"
    mine, theirs = (JsonlRecords(path, key=lambda row: row["key"]) for _ in range(2))
    mine.append({"key": "a", "v": 1})
    theirs.append({"key": "b", "v": 2})
    mine.rows.pop("a")  # what a scorer does before scoring a video again
    mine.append({"key": "c", "v": 3})
    mine.compact(order=lambda row: row["key"])
    assert read_jsonl(path) == [{"key": "b", "v": 2}, {"key": "c", "v": 3}]
    assert mine.rows == {"b": {"key": "b", "v": 2}, "c": {"key": "c", "v": 3}}


# ---- torn videos


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MB file system (tmpfs); skipped where this process may not mount one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount permission): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_full_disk_fails_clearly_and_leaves_no_torn_video(small_disk, tmp_path):
    run_dir = small_disk / "run"
    filler = small_disk / "filler"
    stats = os.statvfs(small_disk)
    # Room for the run's small files, not for a video (a tiny twin's is about 75 kB).
    filler.write_bytes(bytes(stats.f_bavail * stats.f_frsize - 60 * 1024))
    args = [PROMPTS, *RUN, f"hydra.run.dir={run_dir}"]
    failed = run_cli("stas.run", *args, cwd=tmp_path)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    message = next(line for line in failed.stderr.splitlines() if line.startswith("stas.run: error:"))
    assert message.startswith("stas.run: error: cannot write video ")
    assert f"{run_dir / VIDEOS_DIR / 'a cat-0.mp4'}" in message and "No space left on device" in message
    # Nothing torn in videos/, .partial/ or the records: the run made nothing of its own, so its directory is gone
    assert not run_dir.exists(), sorted(map(str, run_dir.rglob("*")))
    filler.unlink()
    resumed = run_cli("stas.run", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 video(s) generated, 0 already complete" in resumed.stdout
    assert all(read_mp4(run_dir / row["path"]).shape[0] == row["num_frames"]
               for row in read_jsonl(run_dir / "generation.jsonl"))


def test_a_torn_video_is_made_again(tmp_path):
    run_dir = tmp_path / "run"
    gen(run_dir, PROMPTS)
    rows = read_jsonl(run_dir / "generation.jsonl")
    torn, whole = (run_dir / row["path"] for row in rows)
    original, whole_mtime = torn.read_bytes(), whole.stat().st_mtime_ns
    torn.write_bytes(original[: len(original) // 2])  # what a full disk or a broken copy leaves
    summary = gen(run_dir, PROMPTS)
    assert (summary.generated, summary.skipped) == (1, 1)
    assert torn.read_bytes() == original and whole.stat().st_mtime_ns == whole_mtime
    # Rows written before sizes were recorded: the video must decode to its frames
    atomic_write_jsonl(run_dir / "generation.jsonl", [{k: v for k, v in row.items() if k != "bytes"} for row in rows])
    torn.write_bytes(original[:-1000])
    summary = gen(run_dir, PROMPTS)
    assert (summary.generated, summary.skipped) == (1, 1)
    assert torn.read_bytes() == original and whole.stat().st_mtime_ns == whole_mtime


def test_a_video_made_again_is_scored_again(tmp_path):
    cfg, run_dir = make_run(tmp_path, ["eval.evaluators=[pixel]"])
    assert evaluate_run(cfg, run_dir).scored == {"pixel": 2}
    remade = sorted((run_dir / VIDEOS_DIR).glob("*.mp4"))[0]
    before = {row["metric"]: row["value"] for row in read_jsonl(run_dir / METRICS_FILE) if row["video"] == remade.name}
    write_mp4(chunky_frames(99), remade, cfg.model.fps, run_dir / PARTIAL_DIR)  # other frames, same name
    summary = evaluate_run(cfg, run_dir)
    assert summary.scored == {"pixel": 1} and summary.cached == {"pixel": 1}
    after = {row["metric"]: row["value"] for row in read_jsonl(run_dir / METRICS_FILE) if row["video"] == remade.name}
    assert after.keys() == before.keys() and after != before


LOCK_AND_WAIT = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_leftovers_of_dead_processes_are_removed_files_being_written_are_kept(tmp_path):
    run_dir = tmp_path / "run"
    gen(run_dir, PROMPTS)
    partial = run_dir / PARTIAL_DIR
    partial.mkdir()  # a finished run tidies it away; killed processes leave it with their files
    (partial / "4242-a cat-0.mp4").write_bytes(b"left by a killed process")
    (partial / "a dog-0.mp4").write_bytes(b"left by a killed process")
    live = partial / "a bird-0.mp4"  # being written by a live process (of this machine or another)
    writer = subprocess.Popen([sys.executable, "-c", LOCK_AND_WAIT, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "locked\n"
        assert gen(run_dir, PROMPTS).skipped == 2
        assert [path.name for path in partial.iterdir()] == [live.name]
    finally:
        writer.kill()  # kill -9: its lock dies with it
        writer.wait()
    gen(run_dir, PROMPTS)
    assert not partial.exists()


# ---- processes started at once into one run directory

RACER = """
import os, sys
from pathlib import Path
from stas.cli import compose_config
from stas.errors import UserError
from stas.generation import run_items
from stas.rundir import claim_run_dir

run_dir, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = compose_config(sys.argv[4:])
manifest = [item.manifest_row() for item in run_items(cfg)]
ready.touch()
while not os.path.exists(go):
    pass
try:
    claim_run_dir(run_dir, cfg, manifest)
    print("claimed")
except UserError as err:
    print(f"refused: {err}")
"""


def race_claims(sync_dir, run_dir, *overrides) -> list[str]:
    """claim_run_dir of every override list, each in its own process, all released at the same instant."""
    sync_dir.mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", RACER, str(run_dir), str(sync_dir / f"ready{n}"),
                                   str(sync_dir / "go"), *ovr], cwd=REPO, stdout=subprocess.PIPE, text=True)
                 for n, ovr in enumerate(overrides)]
    while not all((sync_dir / f"ready{n}").exists() for n in range(len(overrides))):
        assert all(process.poll() is None for process in processes)
    (sync_dir / "go").touch()
    return [process.communicate(timeout=120)[0].strip() for process in processes]


@pytest.mark.slow
def test_claiming_a_run_dir_is_atomic(tmp_path):
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        outcomes = race_claims(tmp_path / f"sync{attempt}", run_dir, ["model.steps=2"], ["model.steps=3"])
        assert sorted(outcome.split(":")[0] for outcome in outcomes) == ["claimed", "refused"], outcomes
        winner = 2 if outcomes[0] == "claimed" else 3
        assert load_identity(run_dir)["model"]["steps"] == winner
        assert "already holds a run with another config" in max(outcomes, key=len)
        assert read_jsonl(run_dir / "items.jsonl")


@pytest.mark.slow
def test_two_configs_started_at_once_into_one_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    processes = [start_cli("stas.run", PROMPTS, *RUN, f"model.steps={steps}", f"hydra.run.dir={run_dir}",
                           cwd=tmp_path) for steps in (2, 3)]
    results = finish(processes)
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (_, out, _), (_, _, err) = sorted(results)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("stas.run: error: ")
    assert "already holds a run with another config; refusing to mix them. Differing keys: model.steps" in err
    steps = load_identity(run_dir)["model"]["steps"]
    rows = read_jsonl(run_dir / "generation.jsonl")
    assert len(rows) == 2 and {row["steps"] for row in rows} == {steps}
    assert "2 video(s) generated" in out and len(list((run_dir / VIDEOS_DIR).iterdir())) == 2
    assert_hydra_files_are_the_runs(run_dir, tmp_path)


def assert_hydra_files_are_the_runs(run_dir, cwd):
    """.hydra/ holds the config of the run that holds the directory, so stas.evaluate composes that run."""
    steps = load_identity(run_dir)["model"]["steps"]
    assert f"model.steps={steps}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert f"  steps: {steps}\n" in (run_dir / ".hydra" / "config.yaml").read_text()
    scored = run_cli("stas.evaluate", run_dir, "eval.evaluators=[pixel]", "logger=none", "progress=false", cwd=cwd)
    assert scored.returncode == 0, scored.stderr


@pytest.mark.slow
def test_a_refused_run_leaves_the_run_dirs_hydra_files(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli("stas.run", PROMPTS, *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    refused = run_cli("stas.run", PROMPTS, *RUN, "model.steps=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert refused.returncode == 2 and "Differing keys: model.steps: existing=2, new=3" in refused.stderr
    assert_hydra_files_are_the_runs(run_dir, tmp_path)


@pytest.mark.slow
def test_the_same_run_started_at_once_makes_every_video_once(tmp_path):
    run_dir = tmp_path / "run"
    prompts = "prompts.prompts=[a cat,a dog,a bird,a fish,a horse]"
    launches = [[], [], ["shard.index=0", "shard.count=2"]]  # twice the whole run, and a shard of it
    results = finish([start_cli("stas.run", prompts, *RUN, *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path)
                      for extra in launches])
    assert all(code == 0 for code, _, _ in results), results
    assert sum(generated(out) for _, out, _ in results) == 5
    rows = [row for path in record_files(run_dir, "generation") for row in read_jsonl(path)]
    assert sorted(row["key"] for row in rows) == [f"{n}:0" for n in range(5)]  # one row per video, in all files
    assert set(generation_rows(run_dir)) == {f"{n}:0" for n in range(5)}
    assert not (run_dir / PARTIAL_DIR).exists()  # no claim left, and the empty folder tidied
    rerun = run_cli("stas.run", prompts, *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert "0 video(s) generated, 5 already complete" in rerun.stdout
