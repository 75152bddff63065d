"""Channel peaks (largest |h| over the tokens, per channel): which reduction kernel is fastest on this device.

stas.core.massive.channel_peaks, the one full read of the hidden states in the steering hook with auto-detected MA
channels, picks its kernel per device: on CUDA one fused reduction (infinity norm) that reads the tensor once, on
CPU amax and amin (two passes). This script times those and the other exact candidates on a block output's shape.

    python benchmarks/peak_reduction.py                     # CPU: (1, 4080, 512) float32, a cpu_mid block output
    python benchmarks/peak_reduction.py --device cuda       # (1, 32760, 1536) bfloat16, Wan2.1-1.3B at 81x480x832

The last line printed is `fastest=<kernel> channel_peaks_vs_fastest=<ratio of medians>`.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from timing import at_least, benchmark_parser, device_synchronizer, interleave, machine, run_benchmark, sizes, table

KERNELS = {
    "amax_amin": lambda h: torch.maximum(h.amax(dim=1), h.amin(dim=1).neg()),
    "vector_norm_inf": lambda h: torch.linalg.vector_norm(h, float("inf"), dim=1),
    "aminmax": lambda h: torch.maximum(*(lambda r: (r.max, r.min.neg()))(torch.aminmax(h, dim=1))),
    "abs_amax": lambda h: h.abs().amax(dim=1),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "fewer rounds")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--shape", type=sizes("--shape", "BATCHxTOKENSxCHANNELS", "1x4080x512"),
                        help="BATCHxTOKENSxCHANNELS (default: per device, see above)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, "
                        "bfloat16 on CUDA")
    parser.add_argument("--rounds", type=at_least(1), help="timed rounds (default 15, 5 with --quick)")
    parser.add_argument("--calls", type=at_least(1), default=10, help="kernel calls per timed repetition")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    return run_benchmark("peak_reduction.py", argv, parse_args(argv), measure, lambda result: (
        f"fastest={result['fastest']} channel_peaks_vs_fastest={result['channel_peaks_vs_fastest']:.4f}"))


def measure(args) -> dict:
    from stas.backbones import DTYPES
    from stas.core.massive import channel_peaks

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"peak_reduction: error: --device {args.device} but CUDA is not available here")
    on_cuda = device.type == "cuda"
    shape = args.shape or ((1, 32760, 1536) if on_cuda else (1, 4080, 512))
    dtype = DTYPES[args.dtype or ("bfloat16" if on_cuda else "float32")]
    hidden = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    hidden[:, :, 5] *= 100.0  # a massive channel, as the steered hidden states have
    expected = channel_peaks(hidden, dim=1)
    for name, kernel in KERNELS.items():
        if not torch.equal(kernel(hidden), expected):
            raise AssertionError(f"{name} disagrees with stas.core.massive.channel_peaks")

    def repeated(kernel):
        return lambda: [kernel(hidden) for _ in range(args.calls)]

    cases = {"channel_peaks": repeated(lambda h: channel_peaks(h, dim=1))}
    cases.update({name: repeated(kernel) for name, kernel in KERNELS.items()})
    rounds = args.rounds or (5 if args.quick else 15)
    timings = interleave(cases, repeats=rounds, warmup=1, synchronize=device_synchronizer(device))
    fastest = min(KERNELS, key=lambda name: timings[name].median)
    megabytes = hidden.numel() * hidden.element_size() / 1e6
    result = {
        "benchmark": "peak_reduction",
        "machine": machine(device),
        "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "device": str(device), "calls": args.calls,
        "ms_per_call": {name: 1e3 * t.median / args.calls for name, t in timings.items()},
        "timings": {name: t.as_dict() for name, t in timings.items()},
        "fastest": fastest,
        "channel_peaks_vs_fastest": timings["channel_peaks"].ratio_to(timings[fastest]),
    }
    print(f"channel peaks of a {'x'.join(map(str, shape))} {result['dtype']} tensor ({megabytes:.1f} MB) on {device}, "
          f"{args.calls} calls per repetition, {rounds} interleaved rounds")
    print(f"  machine: {json.dumps(result['machine'])}")
    for name, ms in result["ms_per_call"].items():
        print(f"  {name:16s} {ms:8.3f} ms per call, {megabytes / ms:7.1f} GB/s if it read the tensor once")
    print(table([(name, t) for name, t in timings.items()], baseline=timings[fastest], cpu_time=not on_cuda))
    return result


if __name__ == "__main__":
    main()
