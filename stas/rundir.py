"""The run directory: atomic writes, append-only JSON-lines records that survive a kill, and the run's identity.

A run directory holds one experiment's outputs. Several processes (shards, re-runs after a kill) may write into it,
so every file is either appended line by line (and repaired on the next open) or replaced atomically.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml
from omegaconf import OmegaConf

from stas.errors import ConfigError, UserError

IDENTITY_FILE = "run_identity.yaml"
MANIFEST_FILE = "items.jsonl"
VIDEOS_DIR = "videos"
# What the code reading a run directory uses of each row of its files (checked_rows checks them).
MANIFEST_FIELDS = {"key": str, "prompt": str, "index": int, "seed": int, "file": str}
GENERATION_FIELDS = {"key": str, "prompt": str, "seed": int, "path": str}
NUMBER_OR_NULL = (int, float, type(None))
METRIC_FIELDS = {"video": str, "prompt": str, "evaluator": str, "metric": str, "value": NUMBER_OR_NULL}
KIND_NAMES = {str: "a string", int: "an integer", NUMBER_OR_NULL: "a number or null"}
HYDRA_DIR = ".hydra"
# Hydra writes .hydra/ before any stas code runs, also in a process that claim_run_dir then refuses: the runs that
# hold the directory keep their files here too, and a refused process puts them back.
HELD_HYDRA_DIR = f"{HYDRA_DIR}/held"
# Keys that change where or how fast a run goes, not what it produces.
NOT_IDENTITY = ("shard", "logger", "progress", "eval", "analysis", "experiment", "name",
                "model.device", "model.cpu_offload", "model.vae_tiling", "model.vae_slicing", "model.compile")
SHARDS_DIR = "shards"
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


class JsonlRecords:
    """Rows of a JSON-lines file, keyed; appends survive a kill, and a torn last line is dropped on open.

    Several processes may write one file at once (two runs of the same config): appends and rewrites hold the
    file's lock, and a rewrite keeps the rows other processes wrote since this one read the file.
    """

    def __init__(self, path: Path, key: Callable[[dict], str]):
        self.path = Path(path)
        self.key = key
        rows, clean = parse_jsonl(read_bytes(self.path)) if self.path.exists() else ([], True)
        self.rows: dict[str, dict] = self._keyed(rows)
        self._known = dict(self.rows)  # the file's rows as this process last read or wrote them
        if not clean or len(self.rows) != len(rows):
            self.compact()

    def _keyed(self, rows: list) -> dict[str, dict]:
        for row in rows:
            if not isinstance(row, dict):
                raise UserError(f"{self.path}: row {_shown(row)} is not a JSON object (is the run directory tampered "
                                "with?)")
        return {self.key(row): row for row in rows}

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = jsonl_text([row]).encode("utf-8")
        with file_lock(self.path) as fd, writing(self.path):
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # after a line torn by a killed writer: keep this row whole
            try:
                unwritten = memoryview(line)
                while unwritten:
                    unwritten = unwritten[os.write(fd, unwritten):]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)  # a full disk: leave no torn row behind
                raise
        self.rows[self.key(row)] = self._known[self.key(row)] = row

    def compact(self, order: Callable[[dict], object] | None = None) -> None:
        """Rewrite the file with one row per key (the last written), atomically.

        Rows that another process wrote meanwhile are kept; keys this process dropped from `rows` are dropped."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path) as fd:
            merged = self._keyed(parse_jsonl(_read_all(fd))[0])
            for key in self._known.keys() - self.rows.keys():
                merged.pop(key, None)
            merged.update({key: row for key, row in self.rows.items() if self._known.get(key) != row})
            rows = list(merged.values())
            if order is not None:
                rows.sort(key=order)
            atomic_write_jsonl(self.path, rows)
        self.rows = self._keyed(rows)
        self._known = dict(self.rows)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def parse_jsonl(data: bytes) -> tuple[list, bool]:
    """The rows of JSON-lines bytes, and whether every line was a whole row (a killed writer leaves a torn one).
    A row is any JSON value: what must be an object is checked by its reader (checked_rows, JsonlRecords). Lines
    that strict JSON refuses (NaN, numbers out of range) count as torn: they are left out.

    Records are split on "\\n" only: prompts may hold other line separators (U+2028, U+0085, ...), which JSON
    writes unescaped and str.splitlines() would split on.
    """
    rows, clean = [], True
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8"), parse_constant=_not_json, parse_float=_finite))
        except (ValueError, RecursionError):  # torn, not UTF-8, NaN/Infinity, a 1e999 or 5000-digit number, [[[[...
            clean = False
    return rows, clean


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


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


def shard_file(run_dir: Path, stage: str, index: int, count: int) -> Path:
    """`<stage>.jsonl` for an unsharded run, `shards/<stage>-III-of-KKK.jsonl` for shard III of KKK."""
    if count == 1:
        return own_file(run_dir, f"{stage}.jsonl")
    return own_file(run_dir, Path(SHARDS_DIR) / f"{stage}-{index:03d}-of-{count:03d}.jsonl")


def record_files(run_dir: Path, stage: str) -> list[Path]:
    """The merged record file of a stage (if any) followed by its shard files."""
    merged = own_file(run_dir, f"{stage}.jsonl")
    shards = sorted(own_file(run_dir, SHARDS_DIR).glob(f"{stage}-*-of-*.jsonl"))
    return ([merged] if merged.exists() else []) + [own_file(run_dir, Path(SHARDS_DIR) / p.name) for p in shards]


def read_jsonl(path: Path) -> list[dict]:
    """The whole rows of a JSON-lines file (a torn last line is left out)."""
    return parse_jsonl(read_bytes(path))[0]


def read_bytes(path: Path) -> bytes:
    """A run-directory file's bytes; a UserError naming it when it cannot be read (a folder in its place, ...)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{path} cannot be read: {err.strerror or err}") from None


def identity(cfg) -> dict:
    """The part of a resolved config that decides what a run produces."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for dotted in NOT_IDENTITY:
        node, *rest = dotted.split(".")
        if rest:
            data.get(node, {}).pop(rest[0], None)
        else:
            data.pop(node, None)
    return data


def flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def differing_keys(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<absent>") != fb.get(k, "<absent>"))


def describe_differences(a: dict, b: dict, keys: Iterable[str], names=("existing", "new")) -> str:
    fa, fb = flatten(a), flatten(b)
    return "; ".join(f"{k}: {names[0]}={fa.get(k, '<absent>')!r}, {names[1]}={fb.get(k, '<absent>')!r}" for k in keys)


def load_identity(run_dir: Path) -> dict:
    """The run's identity (run_identity.yaml, plain YAML: no tags); a UserError when it is missing or malformed."""
    path = own_file(run_dir, IDENTITY_FILE)
    if not path.is_file():
        raise UserError(f"{run_dir} is not a stas run directory (no {IDENTITY_FILE}; stas.run writes it)")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not the mapping of config keys stas.run writes")
    return data


def read_yaml(path: Path):
    """Plain YAML from a run directory (safe_load: no tags, no objects, no aliases); a UserError naming the file
    otherwise."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not readable YAML: {' '.join(str(err).split())}") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read: {err.strerror or err}") from None


def checked_rows(path: Path, fields: dict) -> list[dict]:
    """read_jsonl's rows of a file from a run directory (untrusted input), each checked to be a JSON object with
    these fields of these kinds (KIND_NAMES); a UserError names the file and the row otherwise."""
    rows = read_jsonl(path)
    wanted = ", ".join(f"{name} ({KIND_NAMES[kind]})" for name, kind in fields.items())
    for row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {_shown(row)} is not a JSON object; each row must be an object with "
                            f"{wanted}")
        for name, kind in fields.items():
            if name not in row:
                raise UserError(f"{path}: row {_shown(row)} has no {name!r}; each row must have {wanted}")
            if isinstance(row[name], bool) or not isinstance(row[name], kind):  # bool is an int to Python only
                raise UserError(f"{path}: row {_shown(row)} has {name}={_shown(row[name])}; it must be "
                                f"{KIND_NAMES[kind]}")
    return rows


def _shown(row, limit: int = 80) -> str:
    """A row as it stands in its file, shortened: how a message names it."""
    text = json.dumps(row, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checked_records(run_dir: Path, stage: str, fields: dict) -> list[dict]:
    """The rows of a stage's record files (merged, then shards; see record_files), each checked (checked_rows)."""
    return [row for path in record_files(run_dir, stage) for row in checked_rows(path, fields)]


def read_manifest(run_dir: Path) -> list[dict]:
    """The run's item manifest (items.jsonl), checked; a UserError when it is missing or a row is malformed."""
    path = own_file(run_dir, MANIFEST_FILE)
    if not path.is_file():
        raise UserError(f"{run_dir} has no {MANIFEST_FILE} (the list of the run's videos that stas.run writes): "
                        "is it a run directory of stas.run?")
    return checked_rows(path, MANIFEST_FIELDS)


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


def claim_run_dir(run_dir: Path, cfg, manifest: list[dict]) -> None:
    """Record the run's identity and item manifest, or check that the run that recorded them had the same ones
    (same config, same prompts): outputs of different experiments never mix.

    Both files are created exclusively, so of processes started at once into one directory with different
    configs, exactly one proceeds; the others get the refusal a later run would get, and leave the directory's
    .hydra files as the run that holds it wrote them."""
    try:
        _check_or_record(run_dir, cfg, manifest)
    except ConfigError:
        held = run_dir / HELD_HYDRA_DIR
        for path in sorted(held.glob("*.yaml")) if held.is_dir() else []:
            atomic_write_bytes(run_dir / HYDRA_DIR / path.name, path.read_bytes())
        raise
    for name, text in _hydra_files(cfg).items():  # this run's own, in case a refused one overwrote them meanwhile
        atomic_write_text(run_dir / HELD_HYDRA_DIR / name, text)
        atomic_write_text(run_dir / HYDRA_DIR / name, text)


def _check_or_record(run_dir: Path, cfg, manifest: list[dict]) -> None:
    mine = identity(cfg)
    if not create_exclusive(run_dir / IDENTITY_FILE, yaml_text(mine).encode("utf-8")):
        theirs = load_identity(run_dir)
        keys = differing_keys(theirs, mine)
        if keys:
            raise ConfigError(
                f"{run_dir} already holds a run with another config; refusing to mix them. Differing keys: "
                + describe_differences(theirs, mine, keys)
                + ". Use a new hydra.run.dir, or the same overrides as before."
            )
    if (not create_exclusive(run_dir / MANIFEST_FILE, jsonl_text(manifest).encode("utf-8"))
            and read_jsonl(run_dir / MANIFEST_FILE) != manifest):
        raise ConfigError(f"{run_dir} was started with other prompts (its {MANIFEST_FILE} differs): "
                          "did the prompt file change? Use a new hydra.run.dir.")


def _hydra_files(cfg) -> dict[str, str]:
    """The .hydra files of this process's run, as Hydra and stas.cli write them; none outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.instance().cfg
    return {"config.yaml": OmegaConf.to_yaml(cfg, resolve=True), "hydra.yaml": OmegaConf.to_yaml(hydra),
            # stas.evaluate composes the run's config from these: written so that they read back exactly
            "overrides.yaml": yaml_text(list(hydra.hydra.overrides.task))}
