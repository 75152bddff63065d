"""The framework's overhead: stas.run's generation path vs the diffusers pipeline called directly, same model, seed.

    python benchmarks/framework_overhead.py             # tiny_wan21 (the default model of stas.run), CPU
    python benchmarks/framework_overhead.py --quick     # fewer rounds, one CLI run

Measured, each as interleaved rounds (benchmarks/timing.py), with steer=none, eval=none and logger=none on the stas
side (what the direct side does too):
  per video    stas.generation.sample (what stas.run runs for each video) vs pipe(...) called directly with the same
               arguments and seed; no mp4 encoding on either side. Also checks that both give the same frames.
  generation   stas.run's task on a fresh run directory (validate, claim the run dir, build the pipeline, every
               demo prompt, mp4s, generation.jsonl) vs a plain script doing the same work directly: build the same
               pipeline, pipe(...) and write_mp4 per prompt. mp4 encoding on both sides, with the same encoder.
  CLI          `python -m stas.run` as a user types it (tiny_wan21, STAS, W&B offline, 4 demo prompts), end to end
               in a fresh directory: the foundation issue wants it under 3 minutes on 2 CPU cores.

The last line printed is `overhead_ratio=<median stas / median direct, per video>`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from timing import at_least, benchmark_parser, interleave, machine, run_benchmark, table

REPO = Path(__file__).resolve().parent.parent
CLI_TARGET_S = 180.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "fewer rounds and one CLI run")
    parser.add_argument("--model", default="tiny_wan21", help="a tiny model config of conf/model/ (default tiny_wan21)")
    parser.add_argument("--video-rounds", type=at_least(1), help="timed rounds of the per-video comparison")
    parser.add_argument("--generation-rounds", type=at_least(1), help="timed rounds of the generation comparison")
    parser.add_argument("--prompts", type=at_least(1), help="use only the first N demo prompts (default: all 4)")
    parser.add_argument("--cli-runs", type=at_least(0), help="end-to-end runs of python -m stas.run (0: skip)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    return run_benchmark("framework_overhead.py", argv, parse_args(argv), measure,
                         lambda result: f"overhead_ratio={result['per_video_ratio']:.4f}")


def measure(args) -> dict:
    from stas.backbones import load_pipeline
    from stas.cli import compose_config
    from stas.config import ConfigError, validate
    from stas.generation import run_items

    video_rounds = args.video_rounds or (3 if args.quick else 9)
    generation_rounds = args.generation_rounds or (2 if args.quick else 5)
    cli_runs = args.cli_runs if args.cli_runs is not None else (1 if args.quick else 3)

    overrides = [f"model={args.model}", "steer=none", "eval=none", "logger=none", "progress=false"]
    try:
        cfg = compose_config(overrides + ([f"prompts.limit={args.prompts}"] if args.prompts else []))
    except ConfigError as err:
        sys.exit(f"framework_overhead: error: --model {args.model}: {err}")
    if cfg.model.hub_id is not None:
        sys.exit(f"framework_overhead: error: --model {args.model} is a real checkpoint; use a tiny model config")
    backbone = validate(cfg)
    items = run_items(cfg)
    pipe = load_pipeline(cfg.model, backbone)
    pipe.set_progress_bar_config(disable=True)
    kwargs = backbone.pipeline_kwargs(cfg.model)

    frames = {}
    per_video = interleave(per_video_cases(pipe, items[0], kwargs, backbone, cfg, frames), repeats=video_rounds)
    same_frames = bool((frames["stas"] == frames["direct"]).all())
    with tempfile.TemporaryDirectory(prefix="stas-framework-") as scratch:
        generation = interleave(generation_cases(cfg, backbone, items, Path(scratch)), repeats=generation_rounds)
        cli_seconds = [time_cli(Path(scratch) / f"cli-{n}") for n in range(cli_runs)]

    result = {
        "benchmark": "framework_overhead",
        "machine": machine(torch.device("cpu")),
        "model": {"name": cfg.model.name, "steps": cfg.model.steps, "video": [cfg.model.num_frames,
                  cfg.model.height, cfg.model.width], "prompts": len(items)},
        "per_video": {k: t.as_dict() for k, t in per_video.items()},
        "generation": {k: t.as_dict() for k, t in generation.items()},
        "same_frames": same_frames,
        "ratios": {"per_video": per_video["stas"].ratios_to(per_video["direct"]),
                   "generation": generation["stas"].ratios_to(generation["direct"])},
        "per_video_ratio": per_video["stas"].ratio_to(per_video["direct"]),  # the headline: ratio of medians
        "cli_seconds": cli_seconds,
    }
    print(report(result, per_video, generation))
    return result


def per_video_cases(pipe, item, kwargs, backbone, cfg, frames: dict) -> dict:
    """One video: stas.generation.sample (stas's own loop, guidance=cfg) vs the pipeline call, written as a diffusers
    user writes it: the same frames, bit for bit."""
    from stas.generation import make_loop, sample
    from stas.core.layout import TokenLayout
    from stas.video import to_uint8

    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    loop = make_loop(cfg, backbone)

    def stas_path():
        frames["stas"] = sample(pipe, item, kwargs, None, layout, loop)

    def direct():
        generator = torch.Generator(device="cpu").manual_seed(item.seed)
        frames["direct"] = to_uint8(pipe(prompt=item.prompt, generator=generator, **kwargs).frames[0])

    return {"stas": stas_path, "direct": direct}


def generation_cases(cfg, backbone, items, scratch: Path) -> dict:
    """Every video of the run: stas.run's task vs the same work done directly (pipeline build and mp4s on both)."""
    from stas.run import run
    from stas.backbones.tiny import build_tiny_pipeline
    from stas.video import to_uint8, write_mp4

    runs = iter(range(10**9))

    def stas_run():
        run_dir = scratch / f"stas-{next(runs)}"
        with contextlib.redirect_stdout(io.StringIO()):  # run() prints its summary line
            run(cfg, run_dir)

    def direct():
        out = scratch / f"direct-{next(runs)}"
        out.mkdir()
        pipe = build_tiny_pipeline(cfg.model, backbone).to("cpu")
        pipe.set_progress_bar_config(disable=True)
        kwargs = backbone.pipeline_kwargs(cfg.model)
        for item in items:
            generator = torch.Generator(device="cpu").manual_seed(item.seed)
            video = to_uint8(pipe(prompt=item.prompt, generator=generator, **kwargs).frames[0])
            write_mp4(video, out / item.filename, cfg.model.fps, out / ".partial")

    return {"stas": stas_run, "direct": direct}


def time_cli(cwd: Path) -> float:
    """Wall-clock seconds of the default `python -m stas.run` (W&B offline), from process start to exit."""
    cwd.mkdir(parents=True)
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stas.run"], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"python -m stas.run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def report(result: dict, per_video: dict, generation: dict) -> str:
    model = result["model"]
    cli = result["cli_seconds"]
    cli_line = (f"median {sorted(cli)[len(cli) // 2]:.1f} s of {len(cli)} run(s) ({', '.join(f'{s:.1f}' for s in cli)})"
                f", target < {CLI_TARGET_S:.0f} s" if cli else "skipped (--cli-runs 0)")
    return "\n".join([
        f"framework overhead: {model['name']} ({'x'.join(map(str, model['video']))} frames x px, {model['steps']} "
        f"steps, {model['prompts']} prompts), steer=none, eval=none, logger=none",
        f"  machine: {json.dumps(result['machine'])}",
        "",
        f"per video, no mp4 on either side, {len(per_video['stas'].seconds)} interleaved rounds; same frames on both "
        f"sides: {result['same_frames']}",
        table([("pipe(...) directly", per_video["direct"]), ("stas.generation.sample", per_video["stas"])],
              baseline=per_video["direct"]),
        "",
        f"generation of all {model['prompts']} prompts, pipeline build and mp4s on both sides, "
        f"{len(generation['stas'].seconds)} interleaved rounds",
        table([("direct script", generation["direct"]), ("stas.run task", generation["stas"])],
              baseline=generation["direct"]),
        "",
        f"python -m stas.run (default config, CPU, W&B offline) end to end: {cli_line}",
        "",
        f"per_video_ratio={result['per_video_ratio']:.4f} "
        f"generation_ratio={result['ratios']['generation']['median']:.4f} (target <= 1.01)",
    ])


if __name__ == "__main__":
    main()
