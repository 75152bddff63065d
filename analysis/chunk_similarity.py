"""Frame-pair similarity along the video, vanilla vs steered, with the latent-chunk boundaries marked.

    python analysis/chunk_similarity.py RUN_VANILLA RUN_STEERED --out DIR [--features pixel|dino|clip]
        [--band bootstrap|minmax] [--limit N] [--checkpoint FILE] [--random-weights] [--device auto]

Pairs the two runs' videos by prompt and seed, computes per-frame features exactly as the evaluator of that name
does (pixel needs no weights; dino / clip read their weights from the standard caches or --checkpoint), and writes
DIR/chunk_similarity.png (mean cosine similarity of frames t, t+1 per pair, with a band, latent-chunk boundaries of
the run's backbone marked; below it the paired difference) and DIR/chunk_similarity.csv (one row per run, video and
frame pair). See docs/evaluation.md, "Chunk-boundary similarity".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas.errors import UserError
from stas.evaluation import EvaluatorUnavailable
from stas.evaluation.chunk_similarity import (BANDS, FEATURES, chunk_similarity, feature_extractor, summary_lines,
                                              write_chunk_similarity)
from stas.rundir import check_writable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vanilla", type=Path, help="run directory a (drawn in blue; usually vanilla)")
    parser.add_argument("steered", type=Path, help="run directory b (drawn in red; usually steered)")
    parser.add_argument("--out", type=Path, required=True, help="where chunk_similarity.png / .csv go")
    parser.add_argument("--features", choices=FEATURES, default="pixel")
    parser.add_argument("--band", choices=list(BANDS), default="bootstrap",
                        help="bootstrap: 95%% interval of the mean over videos; minmax: min-max over videos")
    parser.add_argument("--limit", type=int, default=None, help="at most this many shared videos (run a's order)")
    parser.add_argument("--pixel-size", type=int, default=32, help="pixel features: frames pooled to N x N")
    parser.add_argument("--checkpoint", default=None, help="dino / clip: a local weights file")
    parser.add_argument("--random-weights", action="store_true",
                        help="dino / clip with seeded random weights (tests only: the values mean nothing)")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per forward pass of dino / clip")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit={args.limit} must be at least 1")
        if not 1 <= args.pixel_size <= 1024 or not 1 <= args.batch_size <= 4096:
            raise UserError("--pixel-size must be in [1, 1024] and --batch-size in [1, 4096]")
        check_writable(args.out)  # before any feature is computed
        features = feature_extractor(args.features, args.device, args.batch_size, args.pixel_size, args.checkpoint,
                                     args.random_weights)
        result = chunk_similarity(args.vanilla, args.steered, features, args.features, args.limit)
        written = write_chunk_similarity(result, args.out, args.band)
    except (UserError, EvaluatorUnavailable) as err:
        print(f"chunk_similarity: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.features} features, {len(result.keys)} video pair(s), temporal compression "
          f"{result.temporal_compression}" + (f"; {features.note}" if features.note else ""))
    print("\n".join(summary_lines(result)))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
