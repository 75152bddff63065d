"""Side-by-side comparison videos (e.g. vanilla | STAS) of the same prompt and seed from two or more runs.

    python analysis/side_by_side.py RUN_VANILLA RUN_STAS --out comparisons [--prompts 8] [--keys 0:0 3:1]

Writes one labelled mp4 per video whose prompt and seed every run has (runs of different prompt lists pair by prompt
text, not position); labels say which run a panel comes from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas.errors import UserError
from stas.generation import PARTIAL_DIR, generation_rows
from stas.rundir import check_writable, video_path
from stas.results import find_runs, run_labels
from stas.video import read_mp4, side_by_side, write_mp4


def compare(run_dirs: list[Path], out: Path, keys: list[str] | None, limit: int) -> list[Path]:
    """One side-by-side video per (prompt, seed) generated in every run, in the first run's order (`keys`: those
    items of the first run)."""
    runs = [find_runs([d])[0] for d in run_dirs]
    if len(runs) < 2:
        raise UserError("give at least two run directories to compare")
    labels = [f"{run.model} {label}" for run, label in zip(runs, run_labels(runs))]
    videos = [videos_by_prompt_and_seed(run.path) for run in runs]
    common = [pair for pair in videos[0] if all(pair in other for other in videos[1:])]
    if keys:
        pair_of = {row["key"]: pair for pair, row in videos[0].items()}
        unpaired = [key for key in keys if pair_of.get(key) not in common]
        if unpaired:
            shared = ", ".join(videos[0][pair]["key"] for pair in common) or "none"
            raise UserError(f"--keys {' '.join(unpaired)}: not a video of {runs[0].path} whose prompt and seed every "
                            f"run has (the keys of those: {shared})")
        chosen = [pair_of[key] for key in keys]
    else:
        chosen = common[:limit]
    if not chosen:
        raise UserError("the runs share no generated video of the same prompt and seed: compare runs of the same "
                        "prompts and seeds")
    check_writable(out)
    written = []
    for pair in chosen:
        rows = [(run.path, by_pair[pair]) for run, by_pair in zip(runs, videos)]
        clips = [read_mp4(video_path(path, row["path"], f"{path}, row with key {row['key']!r}")) for path, row in rows]
        name = Path(videos[0][pair]["path"]).name
        fps = runs[0].identity["model"]["fps"]
        write_mp4(side_by_side(clips, labels), out / name, fps, out / PARTIAL_DIR)
        written.append(out / name)
    return written


def videos_by_prompt_and_seed(run_dir: Path) -> dict[tuple[str, int], dict]:
    """The run's generated videos keyed by what makes them comparable across runs: prompt text and seed (prompt
    indices differ between runs of different prompt lists)."""
    return {(row["prompt"], row["seed"]): row for row in generation_rows(run_dir).values()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, left to right")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=8, help="how many (prompt, seed) pairs, in run order")
    parser.add_argument("--keys", nargs="*", help="item keys 'prompt_index:sample' of the first run (see its "
                                                  "generation.jsonl)")
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
