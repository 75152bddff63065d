"""The run directory: atomic writes, append-only JSON-lines records that survive a kill, and the run's identity.

A run directory holds one experiment's outputs. Several processes (shards, re-runs after a kill) may write into it,
so every file is either appended line by line (and repaired on the next open) or replaced atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import yaml
from omegaconf import OmegaConf

from stas.config import ConfigError
from stas.errors import UserError

IDENTITY_FILE = "run_identity.yaml"
MANIFEST_FILE = "items.jsonl"
VIDEOS_DIR = "videos"
# What the code reading a run directory uses of each row of its files (checked_rows checks them).
MANIFEST_FIELDS = {"key": str, "prompt": str, "index": int, "seed": int, "file": str}
GENERATION_FIELDS = {"key": str, "prompt": str, "seed": int, "path": str}
NUMBER_OR_NULL = (int, float, type(None))
METRIC_FIELDS = {"video": str, "prompt": str, "evaluator": str, "metric": str, "value": NUMBER_OR_NULL}
KIND_NAMES = {str: "a string", int: "an integer", NUMBER_OR_NULL: "a number or null"}
# Keys that change where or how fast a run goes, not what it produces.
NOT_IDENTITY = ("shard", "logger", "progress", "eval", "analysis", "experiment", "name",
                "model.device", "model.cpu_offload", "model.vae_tiling", "model.vae_slicing")
SHARDS_DIR = "shards"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


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
    """Rows of a JSON-lines file, keyed; appends survive a kill, and a torn last line is dropped on open."""

    def __init__(self, path: Path, key: Callable[[dict], str]):
        self.path = Path(path)
        self.key = key
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            clean = True
            for line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    clean = False  # a write cut short by a kill
                    continue
                self.rows[self.key(row)] = row
            if not clean or len(self.rows) != len(lines):
                self.compact()

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows[self.key(row)] = row

    def compact(self, order: Callable[[dict], object] | None = None) -> None:
        """Rewrite the file with one row per key (the last written), atomically."""
        rows = list(self.rows.values())
        if order is not None:
            rows.sort(key=order)
        atomic_write_jsonl(self.path, rows)


def shard_file(run_dir: Path, stage: str, index: int, count: int) -> Path:
    """`<stage>.jsonl` for an unsharded run, `shards/<stage>-III-of-KKK.jsonl` for shard III of KKK."""
    if count == 1:
        return Path(run_dir) / f"{stage}.jsonl"
    return Path(run_dir) / SHARDS_DIR / f"{stage}-{index:03d}-of-{count:03d}.jsonl"


def record_files(run_dir: Path, stage: str) -> list[Path]:
    """The merged record file of a stage (if any) followed by its shard files."""
    run_dir = Path(run_dir)
    merged = run_dir / f"{stage}.jsonl"
    return ([merged] if merged.exists() else []) + sorted((run_dir / SHARDS_DIR).glob(f"{stage}-*-of-*.jsonl"))


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


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
    path = Path(run_dir) / IDENTITY_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a stas run directory (no {IDENTITY_FILE}; stas.run writes it)")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not the mapping of config keys stas.run writes")
    return data


def read_yaml(path: Path):
    """Plain YAML from a run directory (safe_load: no tags, no objects); a UserError naming the file otherwise."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
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
    path = Path(run_dir) / MANIFEST_FILE
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
    run_root = Path(run_dir).resolve()
    videos = (run_root / VIDEOS_DIR).resolve()
    if run_root not in videos.parents:
        refuse(f"is under {Path(run_dir) / VIDEOS_DIR}, a link that leads out of the run directory to {videos}")
    if videos not in (run_root / relative).resolve().parents:
        refuse(f"leads to {(run_root / relative).resolve()}, outside {Path(run_dir) / VIDEOS_DIR}")
    return Path(run_dir) / relative


def claim_run_dir(run_dir: Path, cfg, manifest: list[dict]) -> None:
    """Record the run's identity and item manifest, or check that an earlier run into the same directory had the
    same ones (same config, same prompts): outputs of different experiments never mix."""
    path = run_dir / IDENTITY_FILE
    mine = identity(cfg)
    if path.exists():
        theirs = load_identity(run_dir)
        keys = differing_keys(theirs, mine)
        if keys:
            raise ConfigError(
                f"{run_dir} already holds a run with another config; refusing to mix them. Differing keys: "
                + describe_differences(theirs, mine, keys)
                + ". Use a new hydra.run.dir, or the same overrides as before."
            )
        if (run_dir / MANIFEST_FILE).exists() and read_jsonl(run_dir / MANIFEST_FILE) != manifest:
            raise ConfigError(f"{run_dir} was started with other prompts (its {MANIFEST_FILE} differs): "
                              "did the prompt file change? Use a new hydra.run.dir.")
    else:
        atomic_write_text(path, yaml.safe_dump(mine, sort_keys=False, allow_unicode=True))
    if not (run_dir / MANIFEST_FILE).exists():
        atomic_write_jsonl(run_dir / MANIFEST_FILE, manifest)
