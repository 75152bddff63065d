"""Time and memory overhead of the MA-analysis capture hooks (stas.capture) against vanilla transformer calls.

A random-init WanTransformer3DModel (default: 8 blocks, dim 512, 4 latent frames of 32 x 32 tokens = 4096 tokens)
runs `--steps` calls per sample, vanilla and with the capture hooks on every block (every step captured, per-token
magnitudes kept for the middle block at two steps, as stas.analyze does by default), interleaved in one process.
Reports the median wall seconds per sample of each and their ratio (target <= 1.05), the same in process CPU
seconds (steadier on a shared machine), the reductions alone timed on a tensor of a block output's size, the capture
buffers' bytes against the documented bound (stas.capture.capture_bytes), and on CUDA the extra peak memory of a
captured sample.

    python benchmarks/capture_overhead.py            # the measured configuration (minutes on 2 CPU cores)
    python benchmarks/capture_overhead.py --quick    # a smaller one, under a minute on 2 CPU cores

The last line is `overhead_ratio=<x>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from stas.backbones import get_backbone
from stas.capture import MACapture, capture_bytes, reduce_hidden
from stas.config import AnalysisSelection
from stas.layout import TokenLayout

QUICK = dict(blocks=4, dim=256, frames=2, height=16, width=16, steps=2, reps=9)


def build_transformer(blocks: int, dim: int, device, dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    heads = max(1, dim // 64)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=64, ffn_dim=4 * dim, num_layers=blocks, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    )
    return model.to(device=device, dtype=dtype).eval()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(transformer, inputs: dict, steps: int, capture: MACapture | None, layout: TokenLayout):
    """(wall, process CPU) seconds for `steps` transformer calls (with a capture: its begin and one readback)."""
    device = inputs["hidden_states"].device
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    if capture is not None:
        capture.begin(layout, steps, do_cfg=False)
    with torch.inference_mode():
        for step in range(steps):
            transformer(**inputs, timestep=torch.tensor([999 - step], device=device), return_dict=False)
    if capture is not None:
        capture.read()  # the readback is part of the cost (it also synchronises)
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def reductions_alone(capture: MACapture, layout: TokenLayout, dim: int, calls: int, device, dtype) -> float:
    """Median seconds of `calls` reductions of one block output (what the hooks add per sample), timed apart."""
    hidden = torch.randn(1, layout.num_tokens, dim, device=device, dtype=dtype)
    masks = torch.stack([layout.mask(region, 1, "rows") for region in ("first_frame", "boundary", "interior")])
    masks = masks.float().to(device)
    sizes = masks.sum(dim=1)
    times = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            reduce_hidden(hidden, masks, sizes, capture.ratio, capture.max_dims)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and video: under a minute on 2 cores")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--frames", type=int, default=4, help="latent frames")
    parser.add_argument("--height", type=int, default=32, help="latent tokens per column, after patchifying")
    parser.add_argument("--width", type=int, default=32, help="latent tokens per row, after patchifying")
    parser.add_argument("--steps", type=int, default=2, help="transformer calls per sample")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each variant")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {action.dest: action.default for action in parser._actions}
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:  # explicit flags still win over --quick
                setattr(args, key, value)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = build_transformer(args.blocks, args.dim, device, dtype)
    layout = TokenLayout(args.frames, args.height, args.width)
    inputs = {
        "hidden_states": torch.randn(1, 16, args.frames, 2 * args.height, 2 * args.width, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 32, 64, device=device, dtype=dtype),
    }
    backbone = dataclasses.replace(get_backbone("wan21_1.3b"), num_layers=args.blocks, hidden_dim=args.dim)
    middle = args.blocks // 2
    selection = AnalysisSelection(layers=tuple(range(args.blocks)), steps=tuple(range(args.steps)),
                                  profile=tuple((middle, step) for step in range(min(2, args.steps))))
    capture = MACapture(backbone, selection, ratio=10.0, max_dims=8, boundary_width=1, boundary_unit="rows")
    print(f"device={device} ({torch.get_num_threads()} threads) dtype={dtype} blocks={args.blocks} dim={args.dim} "
          f"tokens={layout.num_tokens} ({args.frames}x{args.height}x{args.width}) steps={args.steps} reps={args.reps}")

    sample(transformer, inputs, 1, None, layout)  # warm-up: lazy initialisation, allocator, kernels
    with capture.attach(transformer):
        sample(transformer, inputs, args.steps, capture, layout)
    times = {"vanilla": [], "capture": []}
    cpu_times = {"vanilla": [], "capture": []}
    for rep in range(args.reps):
        order = ("vanilla", "capture") if rep % 2 == 0 else ("capture", "vanilla")
        for name in order:
            if name == "vanilla":
                wall, cpu = sample(transformer, inputs, args.steps, None, layout)
            else:
                with capture.attach(transformer):
                    wall, cpu = sample(transformer, inputs, args.steps, capture, layout)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    for name in times:
        print(f"{name}: median {medians[name]:.4f} s wall, {cpu_medians[name]:.4f} s CPU per sample; raw wall "
              + " ".join(f"{v:.4f}" for v in times[name]) + "; raw CPU " + " ".join(f"{v:.4f}" for v in cpu_times[name]))
    print(f"cpu_overhead_ratio={cpu_medians['capture'] / cpu_medians['vanilla']:.4f} "
          f"min_overhead_ratio={min(times['capture']) / min(times['vanilla']):.4f} (fastest runs: least disturbed)")
    alone = reductions_alone(capture, layout, args.dim, args.blocks * args.steps, device, dtype)
    print(f"reductions alone: {alone:.4f} s per sample ({args.blocks * args.steps} block outputs), "
          f"{alone / medians['vanilla']:.2%} of the vanilla median")

    bound = capture.bound_bytes()
    print(f"capture buffers: {capture.buffer_bytes()} bytes (documented bound {bound} bytes; "
          f"one block output alone is {layout.num_tokens * args.dim * torch.finfo(dtype).bits // 8} bytes)")
    if device.type == "cuda":
        peaks = {}
        for name in ("vanilla", "capture"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            if name == "vanilla":
                sample(transformer, inputs, args.steps, None, layout)
            else:
                with capture.attach(transformer):
                    sample(transformer, inputs, args.steps, capture, layout)
            peaks[name] = torch.cuda.max_memory_allocated(device) - base
        print(f"cuda peak memory above the model: vanilla {peaks['vanilla']} bytes, with capture "
              f"{peaks['capture']} bytes (+{peaks['capture'] - peaks['vanilla']})")
    wan = capture_bytes(layers=30, steps=50, branches=2, hidden_dim=1536, profile_pairs=2, tokens=21 * 30 * 52)
    print(f"for reference, the bound for Wan2.1-1.3B at 480x832x81, 50 steps, CFG, all blocks: {wan} bytes")
    ratio = medians["capture"] / medians["vanilla"]
    print(f"overhead_ratio={ratio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
