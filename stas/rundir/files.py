"""Files of a run directory: atomic writes, locks and claims, safe YAML, and paths that never leave the run.

A run directory holds one experiment's outputs. Several processes (shards, re-runs after a kill) may write into it,
so every file is either appended line by line (and repaired on the next open) or replaced atomically. A run
directory someone hands over is untrusted input: its own files are never followed through links, and video paths
read from it must stay inside videos/.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import yaml

from stas.errors import UserError

VIDEOS_DIR = "videos"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a quota, a read-only directory) as one clear UserError."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def create_exclusive(path: Path, data: bytes) -> bool:
    """Write `path` if no file has that name yet, atomically: True if this call made it, False if it exists.

    The content is written and synced under a temporary name first and then hard-linked into place, so a process
    that finds the file always reads it whole, and of two processes racing for the name exactly one wins.
    """
    path = Path(path)
    with writing(path):
        tmp = _write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
    return True


def _write_temp(path: Path, data: bytes) -> str:
    """`data` in a synced temporary file beside `path` (same file system, so it can be renamed or linked there)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


@contextmanager
def file_lock(path: Path, wait: bool = True, remove: bool = False) -> Iterator[int | None]:
    """Hold an exclusive lock on the file `path` (created if missing); yields its open descriptor, or None when
    `wait` is false and another live process holds the lock.

    The kernel releases the lock when its holder dies (kill -9 included), and over NFS it is a POSIX lock that
    every client sees, so a lock is never stale. Do the file's I/O through the yielded descriptor: over NFS,
    closing any other descriptor of the file would release the lock. `remove`: delete the file before releasing
    it (a claim that is done). A file replaced or deleted while we waited is locked anew under its name.
    """
    path = Path(path)
    while True:
        with writing(path):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
            except FileNotFoundError:  # its folder was tidied away meanwhile (an empty .partial/ of a finished run)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield None
            return
        except OSError as err:
            os.close(fd)
            raise UserError(f"cannot lock {path}: {err.strerror or err} (the run directory's file system must "
                            "support file locks, as local disks and NFS do)") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield fd
    finally:
        try:
            if remove and _same_file(fd, path):
                path.unlink()
        finally:
            os.close(fd)


def remove_leftovers(partial_dir: Path) -> None:
    """Delete the temporary files that dead processes left in `partial_dir`; a live process holds the lock of
    each of its own (`file_lock`), on this machine or another one sharing the directory."""
    for leftover in sorted(Path(partial_dir).glob("*")):
        if leftover.is_file():
            with file_lock(leftover, wait=False, remove=True):
                pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data) -> None:
    # allow_nan=False: NaN and infinity are not JSON; validation and metric_row keep them out, this makes sure.
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


class _Dumper(yaml.SafeDumper):
    """Writes strings with a Unicode line separator double-quoted, escaped: PyYAML folds a raw U+0085 in a
    single-quoted string into a space when it reads it back. Never writes aliases (the reader refuses them)."""

    def ignore_aliases(self, data) -> bool:
        return True


class _Loader(yaml.SafeLoader):
    """safe_load without aliases: a few nested aliases expand to billions of nodes (a "billion laughs" file)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases are not allowed{self.peek_event().start_mark}")
        return super().compose_node(parent, index)


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if any(c in value for c in "\x85\u2028\u2029") else None))


def yaml_text(data) -> str:
    """YAML that reads back exactly as `data` (prompts may hold any character), Unicode left readable."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def check_writable(run_dir: Path) -> None:
    """Creates `run_dir` if needed and checks that files can be made in it: a read-only or foreign directory, or a
    file in the way, is a UserError before anything is written."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{str(run_dir)!r}: the output directory is a file")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{str(run_dir)!r}: the output directory cannot be created: {err.strerror or err}") from None
    try:
        tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-probe-", delete=True).close()
    except OSError as err:
        raise UserError(f"{str(run_dir)!r}: the output directory cannot be written: {err.strerror or err}") from None


def read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def own_file(run_dir: Path, relative) -> Path:
    """`run_dir / relative` for a file of the run's own (records, identity, manifest): neither it nor a folder on
    the way may be a symbolic link, so reading or writing it stays inside the run directory (untrusted input)."""
    current = Path(run_dir)
    for part in Path(relative).parts:
        current = current / part
        if current.is_symlink():
            raise UserError(f"{current} is a symbolic link; the files of a run directory are never links (is the "
                            "run directory tampered with?)")
    return current


def read_bytes(path: Path) -> bytes:
    """A run-directory file's bytes; a UserError naming it when it cannot be read (a folder in its place, ...)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{path} cannot be read: {err.strerror or err}") from None


def read_yaml(path: Path):
    """Plain YAML from a run directory (safe_load: no tags, no objects, no aliases); a UserError naming the file
    otherwise."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not readable YAML: {' '.join(str(err).split())}") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read: {err.strerror or err}") from None


def video_path(run_dir: Path, relative, where: str) -> Path:
    """`run_dir / relative` for a video path read from a run directory (`where` names the file and row it came from).

    A run directory is untrusted input: the path must be relative, without `..`, and lie inside the run's videos/
    once every symlink is followed (videos/ itself must not lead out of the run directory either); a UserError
    naming `where` refuses anything else.
    """
    def refuse(why: str):
        raise UserError(f"{where}: video path {relative!r} {why}; a run's video paths are relative paths inside "
                        f"its {VIDEOS_DIR}/ folder (is the run directory tampered with?)")

    if not isinstance(relative, str) or not relative or "\x00" in relative:
        refuse("is not a file path")
    if Path(relative).is_absolute():
        refuse("is absolute")
    if ".." in Path(relative).parts:
        refuse("contains '..'")
    try:
        run_root = Path(run_dir).resolve()
        videos = (run_root / VIDEOS_DIR).resolve()
        target = (run_root / relative).resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        refuse(f"cannot be resolved ({err})")
    if run_root not in videos.parents:
        refuse(f"is under {Path(run_dir) / VIDEOS_DIR}, a link that leads out of the run directory to {videos}")
    if videos not in target.parents:
        refuse(f"leads to {target}, outside {Path(run_dir) / VIDEOS_DIR}")
    return Path(run_dir) / relative
