"""Side-by-side comparison videos (e.g. vanilla | STAS) of the same prompt and seed from two or more runs.

    python analysis/side_by_side.py RUN_VANILLA RUN_STAS --out comparisons [--prompts 8] [--keys 0:0 3:1]

Writes one labelled mp4 per (prompt, sample) present in every run; labels say which run a panel comes from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas.errors import UserError
from stas.generation import PARTIAL_DIR, generation_rows
from stas.tables import find_runs, run_label, varying_keys
from stas.video import read_mp4, side_by_side, write_mp4


def compare(run_dirs: list[Path], out: Path, keys: list[str] | None, limit: int) -> list[Path]:
    runs = [find_runs([d])[0] for d in run_dirs]
    if len(runs) < 2:
        raise UserError("give at least two run directories to compare")
    varying = varying_keys(runs)
    labels = [f"{run.model} {run_label(run, varying)}" for run in runs]
    rows = [generation_rows(run.path) for run in runs]
    common = [key for key in rows[0] if all(key in r for r in rows[1:])]
    chosen = [k for k in keys if k in common] if keys else common[:limit]
    if not chosen:
        raise UserError("the runs share no generated (prompt, sample): compare runs of the same prompts and seeds")
    written = []
    for key in chosen:
        clips = [read_mp4(run.path / r[key]["path"]) for run, r in zip(runs, rows)]
        name = Path(rows[0][key]["path"]).name
        fps = runs[0].identity["model"]["fps"]
        write_mp4(side_by_side(clips, labels), out / name, fps, out / PARTIAL_DIR)
        written.append(out / name)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, left to right")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=8, help="how many (prompt, sample) pairs, in run order")
    parser.add_argument("--keys", nargs="*", help="explicit item keys 'prompt_index:sample' (see generation.jsonl)")
    args = parser.parse_args(argv)
    try:
        written = compare(args.runs, args.out, args.keys, args.prompts)
    except (UserError, ValueError) as err:
        print(f"side_by_side: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(written)} comparison video(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
