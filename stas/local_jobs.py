"""The output of submitit_local jobs (`hydra/launcher=local`) on the console.

submitit runs every job in its own process with stdout and stderr going to files under hydra.launcher.submitit_folder;
the launching process waits for them and would print nothing. A Hydra callback (conf/config.yaml) notes the job
folders there when the multirun starts; when the jobs have finished, or one has failed (`print_pending`, called by
the entry point), the launching process prints what each job printed (its summary: videos made, where, scores),
numbered like Hydra's `#N : ...` lines, without submitit's own log lines; for a job that failed, the last lines of its
stderr.
"""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from stas.rundir import remove_empty_dir

SUBMITIT_LINE = re.compile(r"^(submitit (DEBUG|INFO|WARNING|ERROR) \(|\[[^\]]*\]\[submitit\]\[)")
ERROR_LINES = 20  # of a failed job's stderr
LOCAL_LAUNCHER = "hydra_submitit_launcher.submitit_launcher.LocalLauncher"
PENDING: list[tuple[Path, set[Path]]] = []  # (submitit folder, its job folders before the multirun started)


class LocalJobOutput(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        launcher = config.hydra.launcher
        if str(launcher.get("_target_", "")).endswith(LOCAL_LAUNCHER):
            folder = Path(str(launcher.submitit_folder)).parent  # the folder of the jobs' folders (%j: job id)
            PENDING.append((folder, set(job_folders(folder))))

    def on_multirun_end(self, config, **kwargs) -> None:
        print_pending()


def print_pending(out=None) -> None:
    """Print the output of the jobs of every local multirun of this process not reported yet."""
    while PENDING:
        folder, before = PENDING.pop(0)
        remove_empty_dir(folder / "%j")  # submitit makes the pattern itself as a folder
        print_job_outputs([job for job in job_folders(folder) if job not in before], folder, out)


def job_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)) \
        if folder.is_dir() else []


def print_job_outputs(jobs: list[Path], folder: Path, out=None) -> None:
    """What each job in `jobs` (submitit job folders) printed, in job order."""
    out = out or sys.stdout
    described = sorted((describe(job) for job in jobs), key=lambda job: job[0])
    if not described:
        return
    print(f"[stas] output of {len(described)} submitit_local job(s) (all of it under {folder}):", file=out)
    for _, header, failed, lines in described:
        print(f"{header}{' FAILED' if failed else ''}", file=out)
        print("".join(f"  {line}\n" for line in lines), end="", file=out)
    out.flush()


def describe(job: Path) -> tuple[int, str, bool, list[str]]:
    """(job number, '#N : overrides', failed, lines to show) of one job folder."""
    number, header = 1 << 30, f"job {job.name}"
    try:
        with open(job / f"{job.name}_submitted.pkl", "rb") as handle:
            overrides, _, number, *_ = pickle.load(handle).args  # the launcher's own pickle of this job
        header = f"#{number} : {' '.join(overrides)}"
    except Exception:  # noqa: BLE001 - a job folder of another shape: show it by its id
        pass
    result = job / f"{job.name}_0_result.pkl"
    try:
        with open(result, "rb") as handle:
            failed = pickle.load(handle)[0] != "success"
    except Exception:  # noqa: BLE001 - no result: the job died (killed, out of memory)
        failed = True
    lines = _own_lines(job / f"{job.name}_0_log.out")
    if failed:
        lines += _own_lines(job / f"{job.name}_0_log.err")[-ERROR_LINES:]
    return number, header, failed, lines


def _own_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.split("\r")[-1] for line in text.splitlines() if line.strip() and not SUBMITIT_LINE.match(line)]
