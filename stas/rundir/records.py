"""Append-only JSON-lines records that survive a kill, read back strictly and checked field by field."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

from stas.errors import UserError
from stas.rundir.files import atomic_write_jsonl, file_lock, jsonl_text, own_file, read_all, read_bytes, writing

MANIFEST_FILE = "items.jsonl"
SHARDS_DIR = "shards"
# What the code reading a run directory uses of each row of its files (checked_rows checks them).
MANIFEST_FIELDS = {"key": str, "prompt": str, "index": int, "seed": int, "file": str}
GENERATION_FIELDS = {"key": str, "prompt": str, "seed": int, "path": str}
NUMBER_OR_NULL = (int, float, type(None))
METRIC_FIELDS = {"video": str, "prompt": str, "evaluator": str, "metric": str, "value": NUMBER_OR_NULL}
KIND_NAMES = {str: "a string", int: "an integer", NUMBER_OR_NULL: "a number or null"}


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
            merged = self._keyed(parse_jsonl(read_all(fd))[0])
            for key in self._known.keys() - self.rows.keys():
                merged.pop(key, None)
            merged.update({key: row for key, row in self.rows.items() if self._known.get(key) != row})
            rows = list(merged.values())
            if order is not None:
                rows.sort(key=order)
            atomic_write_jsonl(self.path, rows)
        self.rows = self._keyed(rows)
        self._known = dict(self.rows)


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
