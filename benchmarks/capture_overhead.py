"""The MA-analysis capture hooks' overhead: whole sampling runs, vanilla CFG vs CFG with stas.analyze's capture.

    python benchmarks/capture_overhead.py                      # CPU: 8-block dim-512 Wan transformer, 4,080 tokens
    python benchmarks/capture_overhead.py --quick              # smoke run: small model, 3 rounds, under a minute
    python benchmarks/capture_overhead.py --device cuda --model wan21_1.3b    # full Wan2.1-1.3B config, bf16

What runs: the transformers and denoising loop of steering_overhead.py (bench_models.py). The capture is the real
stas.ma.capture.MACapture with stas.analyze's defaults (every block and step, both CFG branches, per-token magnitudes
of the middle block at its default profile steps), attached and begun as stas.ma.analysis does, and read back
once after the run (the readback is part of the cost). Also reported: the capture buffers' bytes against the
documented bound (stas.ma.capture.capture_bytes) and, on CUDA, the extra peak memory of a captured run.

The last line printed is `overhead_ratio=<median captured / median vanilla, whole run>` (target <= 1.05).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from bench_models import Denoiser, add_model_arguments, build_transformer, describe, make_inputs, model_record, \
    select_model
from timing import at_least, benchmark_parser, device_synchronizer, interleave, machine, run_benchmark, table


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "smoke run: 3 rounds of 3 steps (and a small model)")
    add_model_arguments(parser, "cpu_mid on CPU, cpu_small with --quick, wan21_1.3b on CUDA")
    parser.add_argument("--steps", type=at_least(1), help="steps per sampling run (default 5, 3 with --quick)")
    parser.add_argument("--rounds", type=at_least(1), help="timed rounds (default 7, 3 with --quick)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    return run_benchmark("capture_overhead.py", argv, parse_args(argv), measure,
                         lambda result: f"overhead_ratio={result['overhead_ratio']:.4f}")


@dataclass
class CaptureBench:
    denoiser: Denoiser
    capture: object
    layout: object
    steps: int

    def vanilla(self) -> None:
        self.denoiser.run(range(self.steps))

    def captured(self) -> None:
        with self.capture.attach(self.denoiser.transformer):
            self.capture.begin(self.layout, self.steps, do_cfg=True)
            self.denoiser.run(range(self.steps))
            self.capture.read()


def default_capture(backbone, steps: int):
    """stas.analyze's capture with the AnalysisConfig, SteerConfig and detection defaults, for a run of `steps`
    steps."""
    from omegaconf import OmegaConf

    from stas.ma.capture import MACapture
    from stas.config import AnalysisConfig, SteerConfig
    from stas.core.massive import Detection
    from stas.core.selection import analysis_selection

    analysis, steer = OmegaConf.structured(AnalysisConfig), OmegaConf.structured(SteerConfig)
    selection = analysis_selection(analysis, backbone.num_layers, steps)
    return MACapture(backbone, selection, Detection(), steer.boundary_width, steer.boundary_unit)


def peak_memory(device: torch.device, run) -> int:
    """Bytes allocated at the peak of `run()` above what was allocated before it (CUDA)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(args) -> dict:
    name, spec, device = select_model(args, "capture_overhead")
    steps = args.steps or (3 if args.quick else 5)
    rounds = args.rounds or (3 if args.quick else 7)

    from stas.backbones import DTYPES
    from stas.ma.capture import capture_bytes
    from stas.core.layout import TokenLayout

    dtype = DTYPES[spec.dtype]
    transformer, backbone = build_transformer(spec, name, device, dtype, args.seed)
    inputs = make_inputs(spec, backbone, transformer, device, dtype, steps, args.seed)
    layout = TokenLayout.for_video(backbone, spec.video[1], spec.video[2], spec.video[0])
    bench = CaptureBench(Denoiser(transformer, backbone, inputs, dtype), default_capture(backbone, steps), layout,
                         steps)
    timings = interleave({"vanilla": bench.vanilla, "capture": bench.captured}, repeats=rounds, warmup=1,
                         synchronize=device_synchronizer(device))
    capture = bench.capture
    selection = capture.selection
    result = {
        "benchmark": "capture_overhead",
        "machine": machine(device),
        "model": model_record(name, spec, backbone, layout, device),
        "capture": {"blocks": len(selection.layers), "steps": len(selection.steps), "branches": len(capture.branches),
                    "profile": [list(pair) for pair in selection.profile]},
        "runs": {case: t.as_dict() for case, t in timings.items()},
        "ratios": timings["capture"].ratios_to(timings["vanilla"]),
        "overhead_ratio": timings["capture"].ratio_to(timings["vanilla"]),
        "buffer_bytes": capture.buffer_bytes(),
        "bound_bytes": capture.bound_bytes(),
        "block_output_bytes": layout.num_tokens * spec.hidden_dim * torch.finfo(dtype).bits // 8,
        # For scale: the bound of stas.analyze on Wan2.1-1.3B at 81 x 480 x 832, 50 steps, CFG, every block.
        "wan21_full_bound_bytes": capture_bytes(layers=30, steps=50, branches=2, hidden_dim=1536, profile_pairs=2,
                                                tokens=21 * 30 * 52),
    }
    if device.type == "cuda":
        result["cuda_peak_bytes"] = {"vanilla": peak_memory(device, bench.vanilla),
                                     "capture": peak_memory(device, bench.captured)}
    print(report(result, timings, device))
    return result


def report(result: dict, timings: dict, device: torch.device) -> str:
    capture = result["capture"]
    lines = [
        f"capture overhead: {describe(result['model'])}",
        f"  machine: {json.dumps(result['machine'])}",
        f"  capture (stas.analyze defaults): {capture['blocks']} blocks x {capture['steps']} steps x "
        f"{capture['branches']} CFG branches, per-token magnitudes at (block, step) {capture['profile']}",
        "",
        f"whole run: {capture['steps']} steps with CFG, {len(timings['vanilla'].seconds)} interleaved rounds",
        table([("vanilla CFG", timings["vanilla"]), ("CFG + capture", timings["capture"])],
              baseline=timings["vanilla"], cpu_time=device.type == "cpu"),
        "",
        f"capture buffers: {result['buffer_bytes']} bytes (documented bound {result['bound_bytes']} bytes; one block "
        f"output alone is {result['block_output_bytes']} bytes; Wan2.1-1.3B full run bound "
        f"{result['wan21_full_bound_bytes']} bytes)",
    ]
    if "cuda_peak_bytes" in result:
        peaks = result["cuda_peak_bytes"]
        lines.append(f"CUDA peak memory above the model: vanilla {peaks['vanilla']} bytes, with capture "
                     f"{peaks['capture']} bytes (+{peaks['capture'] - peaks['vanilla']})")
    lines.append(f"capture / vanilla, ratio of medians: {result['overhead_ratio']:.4f} (target <= 1.05)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
