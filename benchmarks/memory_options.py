"""STAS under the transformer's memory options (model.group_offload, model.layerwise_casting): device memory,
seconds per run, and whether STAS still steers the same values.

    python benchmarks/memory_options.py --quick                           # CPU smoke run (offloads to the CPU itself)
    python benchmarks/memory_options.py --device cuda --model wan21_1.3b  # full Wan2.1-1.3B config, bf16

Each case builds the preset's transformer afresh (same seed, planted MAs), applies its option as model.* does
(stas.backbones.memory), and times whole runs of --steps steps with CFG, vanilla and with STAS (SteerConfig
defaults, attached and begun as stas.generation does), interleaved. Cases:
  none               the transformer on the device (the reference)
  block_level        group offloading, one block a group, transfers on the default stream
  block_level_stream the same, the next group prefetched on a side stream (diffusers' use_stream; CUDA only)
  leaf_level         group offloading, one leaf layer a group
  float8_e4m3fn      layerwise casting: weights stored in float8, computed in the preset's dtype
Reported per case: the median seconds of a run (vanilla, STAS) and their ratio; on CUDA the memory the weights hold
on the device before a run and the peak during a STAS run; STAS's values steered; the largest difference of STAS's
final latents from those of `none`. Group offloading only moves weights, so that difference must be 0 (the check
this benchmark exists for: the STAS hooks compose with diffusers' offloading hooks on a real device); float8 storage
changes the weights, so there it is not 0, but STAS must steer as many values.

The last line printed is `offload_max_abs_diff=<largest difference of any group offloading case>`.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from bench_models import Denoiser, add_model_arguments, build_transformer, describe, make_inputs, model_record, \
    select_model
from steering_overhead import default_steerer
from timing import at_least, benchmark_parser, device_synchronizer, interleave, machine, run_benchmark, table

CASES = ("none", "block_level", "block_level_stream", "leaf_level", "float8_e4m3fn")
STREAM_CASES = ("block_level_stream",)  # need a CUDA device


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "smoke run: a small model, 2 steps, 1 round")
    add_model_arguments(parser, "cpu_mid on CPU, cpu_small with --quick, wan21_1.3b on CUDA")
    parser.add_argument("--steps", type=at_least(1), help="steps per run (default 3; the window steers the first 2)")
    parser.add_argument("--rounds", type=at_least(1), help="timed rounds per case (default 2, 1 with --quick)")
    parser.add_argument("--cases", nargs="+", choices=CASES, help="which cases (default: all that the device runs)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    return run_benchmark("memory_options.py", argv, parse_args(argv), measure,
                         lambda result: f"offload_max_abs_diff={result['offload_max_abs_diff']}")


def prepare(transformer, case: str, device: torch.device) -> None:
    """Apply `case`'s memory option to a transformer built on `device`, as stas.backbones.memory does."""
    from stas.backbones.memory import apply_group_offloading, apply_layerwise_casting

    if case.startswith("block_level") or case == "leaf_level":
        transformer.to("cpu")  # group offloading keeps the weights on the CPU and onloads them group by group
        apply_group_offloading(transformer, case.removesuffix("_stream"), device, stream=case in STREAM_CASES)
    elif case != "none":
        apply_layerwise_casting(transformer, case)


def measure(args) -> dict:
    name, spec, device = select_model(args, "memory_options")
    steps = args.steps or (2 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    cases = args.cases or [case for case in CASES if device.type == "cuda" or case not in STREAM_CASES]
    if device.type != "cuda" and set(cases) & set(STREAM_CASES):
        raise SystemExit(f"memory_options: error: --cases {' '.join(STREAM_CASES)} needs --device cuda")
    if "none" not in cases:
        cases = ["none", *cases]  # the reference the differences are taken from

    from stas.backbones import DTYPES
    from stas.core.layout import TokenLayout

    dtype = DTYPES[spec.dtype]
    synchronize = device_synchronizer(device)
    results, timings, reference = {}, {}, None
    for case in cases:
        transformer, backbone = build_transformer(spec, name, device, dtype, args.seed)
        prepare(transformer, case, device)
        inputs = make_inputs(spec, backbone, transformer, device, dtype, steps, args.seed)
        layout = TokenLayout.for_video(backbone, spec.video[1], spec.video[2], spec.video[0])
        denoiser, steerer = Denoiser(transformer, backbone, inputs, dtype), default_steerer(backbone)
        final = {}

        def steered():
            with steerer.attach(transformer):
                steerer.begin(layout, steps, do_cfg=True)
                final["stas"] = denoiser.run(range(steps))

        resident = memory_allocated(device)
        reset_peak(device)
        timings[case] = interleave({"vanilla": lambda: denoiser.run(range(steps)), "stas": steered},
                                   repeats=rounds, warmup=1, synchronize=synchronize)
        # The peak over every run of the case: the STAS runs hold as much as the vanilla ones plus the hook's
        # small temporaries.
        peak = max_memory_allocated(device)
        latents = final["stas"].float().cpu()
        reference = latents if case == "none" else reference
        results[case] = {
            "seconds": {kind: t.as_dict() for kind, t in timings[case].items()},
            "stas_ratio": timings[case]["stas"].ratios_to(timings[case]["vanilla"]),
            "device_bytes_before_run": resident, "device_peak_bytes": peak,
            "values_steered": steerer.record()["values_steered"],
            "max_abs_diff_from_none": float((latents - reference).abs().max()),
        }
        del transformer, denoiser, steerer, inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    offloaded = [results[case]["max_abs_diff_from_none"] for case in results if "level" in case]
    result = {
        "benchmark": "memory_options",
        "machine": machine(device),
        "model": model_record(name, spec, backbone, layout, device),
        "steps": steps,
        "cases": results,
        "offload_max_abs_diff": max(offloaded) if offloaded else None,
    }
    print(report(result, timings))
    return result


def memory_allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def max_memory_allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def report(result: dict, timings: dict) -> str:
    def gigabytes(value):
        return "-" if value is None else f"{value / 1e9:.2f} GB"

    lines = [f"memory options: {describe(result['model'])}", f"  machine: {json.dumps(result['machine'])}",
             f"  whole runs of {result['steps']} steps with CFG, vanilla and STAS (SteerConfig defaults)", ""]
    for case, record in result["cases"].items():
        lines += [f"{case}: weights on the device {gigabytes(record['device_bytes_before_run'])}, peak "
                  f"{gigabytes(record['device_peak_bytes'])}; STAS steered {record['values_steered']} values; "
                  f"final latents differ from none's by at most {record['max_abs_diff_from_none']:.3g}",
                  table([("vanilla CFG", timings[case]["vanilla"]), ("CFG + STAS", timings[case]["stas"])],
                        baseline=timings[case]["vanilla"], cpu_time=result["model"]["device"] == "cpu"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
