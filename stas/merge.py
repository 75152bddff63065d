"""`python -m stas.merge TARGET [SOURCE ...]`: join the shards of a run into one complete run directory.

Shards of one run write `shards/<stage>-III-of-KKK.jsonl` into a shared run directory (or each into a directory of
its own). The merge checks that every directory holds the same run (same identity and item manifest), reports the
items still missing, copies videos from source directories into TARGET, and writes the merged `generation.jsonl`,
`metrics.jsonl` and `metrics.json` in the order of an unsharded run, so that a merged run and an unsharded one
have the same files and the same results.

Every directory is untrusted input: a malformed file, a row without its fields, or a video path that leaves the
directory's videos/ (absolute, `..`, a symlink) stops the merge with a message naming it, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stas.errors import UserError
from stas.evaluation import aggregate_metrics
from stas.generation import generation_rows
from stas.rundir import (
    MANIFEST_FILE,
    METRIC_FIELDS,
    VIDEOS_DIR,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    check_writable,
    checked_records,
    describe_differences,
    differing_keys,
    load_identity,
    read_manifest,
    video_path,
)

REPORT_FILE = "merge_report.json"


@dataclass
class MergeReport:
    target: Path
    expected: int
    present: int
    copied: int
    missing: list[dict] = field(default_factory=list)
    metric_rows: int = 0

    @property
    def complete(self) -> bool:
        return not self.missing

    def __str__(self) -> str:
        lines = [f"{self.present}/{self.expected} videos in {self.target} ({self.copied} copied from sources), "
                 f"{self.metric_rows} metric rows"]
        if self.missing:
            lines.append(f"INCOMPLETE: {len(self.missing)} item(s) missing, e.g.:")
            lines += [f"  key {m['key']}: {m['prompt']!r} sample {m['index']} (seed {m['seed']})"
                      for m in self.missing[:10]]
            lines.append("re-run the shards (they finish only what is missing), then merge again")
        return "\n".join(lines)


def check_same_run(target: Path, sources: list[Path]) -> list[dict]:
    """The target's item manifest, after checking every source holds the same run; refuses naming the keys."""
    mine = load_identity(target)
    manifest = read_manifest(target)
    for source in sources:
        theirs = load_identity(source)
        keys = differing_keys(mine, theirs)
        if keys:
            raise UserError(f"cannot merge {source} into {target}: they are runs of different configs. Differing "
                            f"keys: {describe_differences(mine, theirs, keys, names=('target', 'source'))}")
        if read_manifest(source) != manifest:
            raise UserError(f"cannot merge {source} into {target}: their prompt/seed manifests ({MANIFEST_FILE}) differ")
    return manifest


def merge(target: Path, sources: list[Path] = ()) -> MergeReport:
    """Every directory is untrusted input: all of it is read and checked before the first byte is written."""
    target, sources = Path(target), [Path(s) for s in sources if Path(s).resolve() != Path(target).resolve()]
    manifest = check_same_run(target, sources)
    order = {item["key"]: n for n, item in enumerate(manifest)}
    files = {item["key"]: f"{VIDEOS_DIR}/{item['file']}" for item in manifest}
    found: dict[str, tuple[Path, dict]] = {}
    for run_dir in [target, *sources]:  # the target's own copy wins
        for key, row in generation_rows(run_dir, whole_only=False).items():
            if row["path"] != files.get(key):
                raise UserError(f"{run_dir}'s generation records, row with key {key!r}: its video {row['path']!r} is "
                                f"not the one {MANIFEST_FILE} names for that key ({files.get(key, 'no such key')}); is "
                                "the run directory tampered with?")
        for key, row in generation_rows(run_dir).items():
            found.setdefault(key, (run_dir, row))
    copies = []
    for run_dir, row in found.values():
        destination = video_path(target, row["path"], f"{target} (merge target), row with key {row['key']!r}")
        if run_dir != target and not destination.is_file():
            copies.append((video_path(run_dir, row["path"], f"{run_dir}, row with key {row['key']!r}"), destination))
    metric_rows = merged_metrics(target, sources)
    check_writable(target)
    for source, destination in copies:
        atomic_write_bytes(destination, source.read_bytes())
    rows = sorted((row for _, row in found.values()), key=lambda row: order[row["key"]])
    atomic_write_jsonl(target / "generation.jsonl", rows)
    if metric_rows:
        atomic_write_jsonl(target / "metrics.jsonl", metric_rows)
        atomic_write_json(target / "metrics.json", aggregate_metrics(metric_rows))
    report = MergeReport(target, len(manifest), len(rows), len(copies),
                         [item for item in manifest if item["key"] not in found], len(metric_rows))
    atomic_write_json(target / REPORT_FILE, {"complete": report.complete, "expected": report.expected,
                                             "present": report.present, "missing": report.missing})
    return report


def merged_metrics(target: Path, sources: list[Path]) -> list[dict]:
    """Union of the metric rows of all directories (one per video, evaluator and metric), in a stable order."""
    merged: dict = {}
    for run_dir in [target, *sources]:
        for row in checked_records(run_dir, "metrics", METRIC_FIELDS):
            merged.setdefault(metric_key(row), row)
    return sorted(merged.values(), key=metric_key)


def metric_key(row: dict) -> tuple:
    return row["video"], row["evaluator"], row["metric"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stas.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="run directory that receives the merged run")
    parser.add_argument("sources", type=Path, nargs="*", help="other directories holding shards of the same run")
    parser.add_argument("--allow-incomplete", action="store_true", help="exit 0 even when items are missing")
    args = parser.parse_args(argv)
    try:
        report = merge(args.target, args.sources)
    except UserError as err:
        print(f"stas.merge: error: {err}", file=sys.stderr)
        raise SystemExit(2)
    print(f"stas.merge: {report}")
    if not report.complete and not args.allow_incomplete:
        raise SystemExit(3)


if __name__ == "__main__":
    main()
