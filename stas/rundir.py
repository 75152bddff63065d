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
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as err:
        raise ConfigError(f"output directory {str(run_dir)!r} cannot be written: {err.strerror or err}") from None


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
    path = Path(run_dir) / IDENTITY_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a stas run directory (no {IDENTITY_FILE}; stas.run writes it)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


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
