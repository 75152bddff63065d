"""Side-by-side comparison videos (e.g. vanilla | STAS) of the same prompt and seed from two or more runs.

    python analysis/side_by_side.py RUN_VANILLA RUN_STAS --out comparisons [--prompts 8] [--keys 0:0 3:1]
        [--diff [--diff-gain 4]] [--height PIXELS]

Writes one mp4 per video whose prompt and seed every run has (runs of different prompt lists pair by prompt text, not
position): the runs' panels scaled to one height, each under a label saying which run it comes from; below them the
pixel frame index and, per panel, the latent frame it belongs to, marked where a new latent frame starts (the latent-
chunk boundaries of the run's backbone). --diff adds |run k - run 1| x gain for every later run. Runs of different
frame counts are cut to the shortest (said on stdout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas.backbones import FAMILIES
from stas.errors import UserError
from stas.generation import PARTIAL_DIR, generation_rows
from stas.rundir import IDENTITY_FILE, check_writable, video_path
from stas.results import Run, find_runs, run_labels
from stas.video import comparison_panels, read_mp4, side_by_side, write_mp4


def compare(run_dirs: list[Path], out: Path, keys: list[str] | None, limit: int, diff_gain: float | None = None,
            height: int | None = None) -> list[Path]:
    """One side-by-side video per (prompt, seed) generated in every run, in the first run's order (`keys`: those
    items of the first run); with `diff_gain`, difference panels (stas.video.comparison_panels)."""
    runs = [one_run(d) for d in run_dirs]
    if len(runs) < 2:
        raise UserError("give at least two run directories to compare")
    labels = [f"{run.model} {label}" for run, label in zip(runs, run_labels(runs))]
    compressions = [temporal_compression(run) for run in runs]
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
    written = []
    for pair in chosen:
        rows = [(run.path, by_pair[pair]) for run, by_pair in zip(runs, videos)]
        clips = [read_mp4(video_path(path, row["path"], f"{path}, row with key {row['key']!r}")) for path, row in rows]
        name = Path(videos[0][pair]["path"]).name
        if len({len(clip) for clip in clips}) > 1:
            print(f"{name}: the runs' videos have {', '.join(str(len(clip)) for clip in clips)} frames: cut to the "
                  f"shortest ({min(len(clip) for clip in clips)})")
        fps = runs[0].identity["model"]["fps"]
        frames = side_by_side(comparison_panels(clips, labels, compressions, height, diff_gain))
        if not written:  # after the first comparison is composed: a refused one (--diff of other shapes) writes nothing
            check_writable(out)
        write_mp4(frames, out / name, fps, out / PARTIAL_DIR)
        written.append(out / name)
    return written


def one_run(path: Path) -> Run:
    """The run at or below `path` (runs/vanilla holds runs/vanilla/<date>_<time>); refused when there are several."""
    found = find_runs([path])
    if len(found) > 1:
        raise UserError(f"{path} holds {len(found)} runs ({', '.join(str(run.path) for run in found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}): give the directory of one of them")
    return found[0]


def temporal_compression(run: Run) -> int:
    """How many pixel frames the run's backbone packs into one latent frame (after frame 0), from the family its
    run_identity.yaml records."""
    family = run.identity["model"].get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise UserError(f"{run.path / IDENTITY_FILE}: model.family={family!r} is not a backbone family stas knows "
                        f"(allowed: {', '.join(FAMILIES)})")
    return FAMILIES[family].temporal_compression


def videos_by_prompt_and_seed(run_dir: Path) -> dict[tuple[str, int], dict]:
    """The run's generated videos keyed by what makes them comparable across runs: prompt text and seed (prompt
    indices differ between runs of different prompt lists)."""
    return {(row["prompt"], row["seed"]): row for row in generation_rows(run_dir).values()}


DIFF_GAIN = 4.0  # differences of 64 grey levels or more show as full white
MAX_DIFF_GAIN, MAX_HEIGHT = 255.0, 4096


def check_options(args) -> None:
    if args.prompts < 1:
        raise UserError(f"--prompts={args.prompts}: must be at least 1")
    if args.diff_gain is not None and not args.diff:
        raise UserError(f"--diff-gain={args.diff_gain:g} needs --diff (the difference panels it amplifies)")
    if args.diff_gain is not None and not 0 < args.diff_gain <= MAX_DIFF_GAIN:  # NaN fails too
        raise UserError(f"--diff-gain={args.diff_gain:g}: must be a number in (0, {MAX_DIFF_GAIN:g}] (default "
                        f"{DIFF_GAIN:g}: |difference| x gain, clipped to 255)")
    if args.height is not None and not 16 <= args.height <= MAX_HEIGHT:
        raise UserError(f"--height={args.height}: must be an integer in [16, {MAX_HEIGHT}] pixels")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, left to right")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=8, help="how many (prompt, seed) pairs, in run order")
    parser.add_argument("--keys", nargs="*", help="item keys 'prompt_index:sample' of the first run (see its "
                                                  "generation.jsonl)")
    parser.add_argument("--diff", action="store_true", help="add |run k - run 1| x gain panels (steered minus "
                                                                 "vanilla when run 1 is vanilla)")
    parser.add_argument("--diff-gain", type=float, default=None, help=f"amplification of the difference panels "
                                                                     f"(default {DIFF_GAIN:g}; needs --diff)")
    parser.add_argument("--height", type=int, default=None, help="panel height in pixels (default: the tallest "
                                                                 "video's); every panel is scaled to it, aspect kept")
    args = parser.parse_args(argv)
    try:
        check_options(args)
        gain = (DIFF_GAIN if args.diff_gain is None else args.diff_gain) if args.diff else None
        written = compare(args.runs, args.out, args.keys, args.prompts, gain, args.height)
    except (UserError, ValueError) as err:
        print(f"side_by_side: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(written)} comparison video(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
