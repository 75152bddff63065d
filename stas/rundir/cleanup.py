"""Tidying run directories: a run that fails before it has made anything of its own leaves no directory behind, and
empty leftovers (`.partial/`) of a finished run go; readers skip run directories that hold no output.

A run directory is untrusted input, and may be shared by several processes of one run (shards, a command started
twice): a directory is removed only when this process found it holding nothing but what Hydra writes when it
starts a job, no other process is working in it (each holds a shared lock on the directory while it runs), and it
now holds nothing but stub files: Hydra's `.hydra/` files, an empty log, the identity and manifest this run
recorded, empty `videos/` and `.partial/`, and the W&B folder of this attempt. Anything else (a video, a record, a
file someone put there, a non-empty log) keeps the whole directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from stas.rundir.files import VIDEOS_DIR
from stas.rundir.records import MANIFEST_FILE, record_files
from stas.rundir.run_identity import HELD_HYDRA_DIR, HYDRA_DIR, IDENTITY_FILE

PARTIAL_DIR = ".partial"
HYDRA_FILES = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})  # what Hydra writes into .hydra/
WANDB_DIR = "wandb"
WANDB_ENTRIES = ("offline-run-", "run-", "latest-run", "debug.log", "debug-internal.log")


def remove_empty_dir(path: Path) -> bool:
    """Remove `path` if it is an empty directory (not a link); True when it was removed. A directory another
    process has just put a file into stays (rmdir refuses a non-empty one)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        path.rmdir()
    except OSError:
        return False
    return True


def has_outputs(run_dir: Path) -> bool:
    """Whether a run directory holds anything a run produced: a generation or metric record, or a file in videos/."""
    if record_files(run_dir, "generation") or record_files(run_dir, "metrics"):
        return True
    videos = Path(run_dir) / VIDEOS_DIR
    return videos.is_dir() and not videos.is_symlink() and any(videos.iterdir())


def run_dirs_below(path: Path, skipped: list[Path]) -> list[Path]:
    """The run directories (with run_identity.yaml) at or below `path` that hold any output; the others (failed
    before their first video, or not started) are added to `skipped`."""
    path = Path(path)
    found = [path] if (path / IDENTITY_FILE).is_file() else [p.parent for p in path.rglob(IDENTITY_FILE)]
    outputs = [has_outputs(run_dir) for run_dir in found]
    skipped += [run_dir for run_dir, output in zip(found, outputs) if not output]
    return [run_dir for run_dir, output in zip(found, outputs) if output]


def _plain_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _empty_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == 0


def _hydra_dir_only(path: Path, held: bool) -> bool:
    """`.hydra/` holding only Hydra's files (and, with `held`, stas's copy of them in `held/`)."""
    if not _plain_dir(path):
        return False
    for entry in path.iterdir():
        if held and entry.name == Path(HELD_HYDRA_DIR).name and _plain_dir(entry):
            if not all(e.name in HYDRA_FILES and e.is_file() and not e.is_symlink() for e in entry.iterdir()):
                return False
        elif not (entry.name in HYDRA_FILES and entry.is_file() and not entry.is_symlink()):
            return False
    return True


def _wandb_only(path: Path) -> bool:
    return _plain_dir(path) and all(entry.name.startswith(WANDB_ENTRIES) for entry in path.iterdir())


def hydra_start_only(run_dir: Path, log_name: str) -> bool:
    """Whether `run_dir` holds only what Hydra writes when it starts a job: `.hydra/` with its files, an empty log."""
    for entry in Path(run_dir).iterdir():
        if entry.name == HYDRA_DIR:
            if not _hydra_dir_only(entry, held=False):
                return False
        elif not (entry.name == log_name and _empty_file(entry)):
            return False
    return True


def is_stub(run_dir: Path, log_name: str) -> bool:
    """Whether `run_dir` holds only what a run writes before its first output (see the module's docstring)."""
    run_dir = Path(run_dir)
    if not _plain_dir(run_dir):
        return False
    for entry in run_dir.iterdir():
        name = entry.name
        if name == HYDRA_DIR:
            ok = _hydra_dir_only(entry, held=True)
        elif name in (VIDEOS_DIR, PARTIAL_DIR):
            ok = _plain_dir(entry) and not any(entry.iterdir())
        elif name in (IDENTITY_FILE, MANIFEST_FILE):
            ok = entry.is_file() and not entry.is_symlink()
        elif name == WANDB_DIR:
            ok = _wandb_only(entry)
        else:
            ok = name == log_name and _empty_file(entry)
        if not ok:
            return False
    return True


class RunDirGuard:
    """What a process knows of the run directory it works in: whether it found it fresh (only Hydra's start-up
    files, in a directory this process made), and a shared lock on the directory held until `close()`, so that a
    process that fails never removes a directory another process of the run is working in."""

    def __init__(self, run_dir: Path, log_name: str, made_here: bool = True):
        self.run_dir = Path(run_dir)
        self.log_name = log_name
        self.fresh = made_here and _plain_dir(self.run_dir) and hydra_start_only(self.run_dir, log_name)
        self.fd: int | None = None
        try:
            self.fd = os.open(self.run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # a file system without locks on directories: never remove anything
            self.close()
            self.fresh = False

    def remove_if_stub(self) -> bool:
        """After a failure: remove the directory when it is a stub this process alone made; True when removed."""
        if not self.fresh or self.fd is None:
            return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while another process holds its lock
        except OSError:
            return False
        if not is_stub(self.run_dir, self.log_name):
            return False
        shutil.rmtree(self.run_dir)  # never follows links: a link in wandb/ goes, its target stays
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_empty_parents(path: Path, top: Path) -> None:
    """Remove the empty directories from `path`'s parent up to and including `top` (folders this process made for
    a run directory it has removed); stops at the first one that is not empty."""
    path, top = Path(path).absolute(), Path(top).absolute()
    if top != path and top not in path.parents:
        return
    current = path.parent
    while (current == top or top in current.parents) and remove_empty_dir(current):
        current = current.parent
