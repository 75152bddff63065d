"""One process of tests/test_context_parallel.py: `torchrun --nproc_per_node=2 tests/parallel_worker.py OUT TWIN` runs
the tiny Wan twin context-parallel (Ulysses over 2 ranks, gloo, CPU); `python tests/parallel_worker.py OUT TWIN` one
process. For every case it samples one video through stas.generation's path with STAS (when the case steers) and
the analysis capture attached, then one with stas.apply_stas through the pipeline's own `pipe(...)`, and rank 0 (or
the one process) saves the frames, the steering record and the capture readout to OUT with torch.save.

`--local-max` makes every all-reduce MAX a no-op (each rank keeps its own chunk's maximum): the test's proof that
the comparison can fail. `--compile=regional` compiles the blocks (`--compile=hook`: only the steering hook) and runs
the `stas` case twice (the first call compiles), saving dynamo's counts after each under "counts". `--set=KEY=VALUE`
(repeatable) adds a config override to every case and runs only the `stas` case (the memory options)."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

SIZE = ["model.steps=4", "model.num_frames=9"]
# name -> overrides; each case steers (or not) one video of the twin and captures every block and step.
CASES = {
    "none": ["steer=none"],
    "stas": ["steer=stas"],
    "stas_channel_peak": ["steer=stas", "detect=channel_peak"],
    "stas_shared": ["steer=stas", "detect.branches=shared"],
    "stas_fixed_channels": ["steer=stas", "steer.dims=[5,17]"],
    "per_channel_max": ["steer=per_channel_max"],
    "stas_slg": ["steer=stas", "guidance=slg"],  # a third, perturbed pass per step (diffusers' layer-skip hooks)
    "stas_pag": ["steer=stas", "guidance=pag"],
}
STEERED = [case for case in CASES if case != "none"]


def run_case(pipe, backbone, overrides: list[str]) -> dict:
    from conftest import compose
    from stas.core.layout import TokenLayout
    from stas.core.massive import Detection
    from stas.core.selection import analysis_selection
    from stas.generation import make_loop, make_steerer, run_items, run_pipeline
    from stas.ma.capture import MACapture

    cfg = compose(overrides)
    steerer, loop = make_steerer(cfg, backbone), make_loop(cfg, backbone)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    kwargs = backbone.pipeline_kwargs(cfg.model)
    selection = analysis_selection(cfg.analysis, backbone.num_layers, cfg.model.steps)
    capture = MACapture(backbone, selection, Detection.of(cfg.detect), cfg.steer.boundary_width,
                        cfg.steer.boundary_unit)
    with steerer.attach(backbone.experts(pipe)) if steerer is not None else nullcontext():
        with capture.attach(backbone.experts(pipe)):
            capture.begin(layout, cfg.model.steps, backbone.uses_cfg(kwargs))
            frames = run_pipeline(pipe, run_items(cfg)[0], kwargs, steerer, layout, loop).frames[0]
            readout = capture.read()
    return {"frames": torch.from_numpy(frames.copy()), "record": None if steerer is None else steerer.record(),
            "capture": {name: getattr(readout, name) for name in ("peaks", "thresholds", "regions", "tokens")}}


def run_apply(pipe, backbone, overrides: list[str]) -> dict:
    """stas.apply_stas on the pipeline, called as a user calls it (`pipe(...)`, diffusers' own loop)."""
    from conftest import compose
    from stas import apply_stas
    from stas.generation import run_items

    cfg = compose(overrides)
    item = run_items(cfg)[0]
    with apply_stas(pipe) as steering, torch.inference_mode():
        frames = pipe(item.prompt, generator=torch.Generator().manual_seed(item.seed),
                      **backbone.pipeline_kwargs(cfg.model)).frames[0]
        record = steering.record()
    return {"frames": torch.from_numpy(frames.copy()), "record": record, "capture": {}}


def main(out: str, twin: str, local_max: bool, compile_mode: str, settings: list[str]) -> None:
    from conftest import compose
    from stas.backbones import compile_counts, load_pipeline
    from stas.config import validate

    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    hook_only = compile_mode == "hook"  # the transformer eager, the steering hook compiled (steer.compile_hook)
    base = [f"model={twin}", "logger=none", *SIZE, f"model.compile={'none' if hook_only else compile_mode}",
            *(["steer.compile_hook=true"] if hook_only else []), *settings]
    base += ["model.parallel.ulysses_degree=2"] if parallel else []
    cfg = compose(base)
    backbone = validate(cfg)
    pipe = load_pipeline(cfg.model, backbone)
    pipe.set_progress_bar_config(disable=True)
    if local_max:
        from stas.core.parallel import TokenSplit

        TokenSplit.max = lambda self, tensor: tensor  # each rank's own maximum: what the all-reduce prevents
    cases = STEERED[:1] if local_max or compile_mode != "none" or settings else list(CASES)
    counts = []
    if compile_mode != "none":  # the warm-up call compiles
        run_case(pipe, backbone, base + CASES["stas"])
        counts.append(compile_counts())
    results = {case: run_case(pipe, backbone, base + CASES[case]) for case in cases}
    if not local_max and compile_mode == "none" and not settings:
        results["apply_stas"] = run_apply(pipe, backbone, base)
    if counts:
        results["counts"] = [*counts, compile_counts()]
    if not parallel or torch.distributed.get_rank() == 0:
        torch.save(results, out)
    if parallel:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    modes = [arg.split("=", 1)[1] for arg in args if arg.startswith("--compile=")]
    main(args[0], args[1], "--local-max" in args, modes[0] if modes else "none",
         [arg.split("=", 1)[1] for arg in args if arg.startswith("--set=")])
