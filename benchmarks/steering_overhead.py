"""STAS's overhead: the same transformer, inputs and steps, vanilla CFG vs CFG + STAS, interleaved in one process.

    python benchmarks/steering_overhead.py                      # CPU: 8-block dim-512 Wan transformer, 4,080 tokens
    python benchmarks/steering_overhead.py --quick              # smoke run: small model, 3 rounds, under a minute
    python benchmarks/steering_overhead.py --device cuda --model wan21_1.3b    # full Wan2.1-1.3B config, bf16
    python benchmarks/steering_overhead.py --device cuda --model cogvideox5b   # full CogVideoX-5B config, bf16

What runs: a random-init diffusers transformer of the chosen config with planted massive activations
(stas.tiny.plant_massive_activations, so that auto-detection finds real channels), driven by the denoising loop of
the pipelines without text encoder and VAE: CFG as the pipeline calls it (Wan: a cond call, then an uncond call per
step; CogVideoX: one call on the batch [uncond, cond]), then a flow-matching Euler update. STAS is the real
StasSteerer with the SteerConfig defaults (window [0, 0.4) of the steps, first_frame+boundary tokens, auto MA
channels, every block, both CFG branches), attached and begun exactly as stas.generation does.

Measured, each as interleaved rounds (benchmarks/timing.py):
  in-window   one denoising step inside the steering window (the worst case): vanilla CFG, CFG + STAS, and CFG plus
              one extra forward pass per step (what STG/PAG-style guidance pays; a full pass, its upper bound);
  whole run   a whole sampling run of --steps steps with the default window: vanilla CFG vs CFG + STAS.
On CUDA the steered calls run under torch.cuda.set_sync_debug_mode("error"): a host-device synchronisation in
the steering hook (or anywhere in the steered step) raises instead of passing silently.

The last line printed is `overhead_ratio=<median steered / median vanilla, in-window step>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from timing import device_synchronizer, interleave, machine, run_benchmark, sizes, table


@dataclass(frozen=True)
class BenchModel:
    """A transformer config to benchmark: the diffusers constructor arguments and the video it denoises."""

    family: str  # a stas backbone family: wan21 (two-pass CFG) or cogvideox (batched CFG)
    transformer: dict  # constructor arguments of the family's diffusers transformer class
    video: tuple[int, int, int]  # pixel frames, height, width
    text_tokens: int
    dtype: str
    about: str

    @property
    def hidden_dim(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]

    @property
    def text_dim(self) -> int:
        return self.transformer["text_dim" if self.family == "wan21" else "text_embed_dim"]


def _wan(layers, heads, head_dim, ffn_dim, text_dim, **extra) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn_dim, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **extra)


def _cogvideox(layers, heads, head_dim, text_dim, time_embed_dim, video, text_tokens) -> dict:
    frames, height, width = video
    return dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
                time_embed_dim=time_embed_dim, text_embed_dim=text_dim, num_layers=layers,
                sample_width=width // 8, sample_height=height // 8, sample_frames=frames, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=text_tokens, activation_fn="gelu-approximate",
                timestep_activation_fn="silu", norm_eps=1e-5, spatial_interpolation_scale=1.875,
                temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=True,
                use_learned_positional_embeddings=False)


PRESETS = {
    # CPU default: 8 blocks, dim 512, 17 x 384 x 544 -> 5 x 24 x 34 = 4,080 tokens.
    "cpu_mid": BenchModel("wan21", _wan(8, 4, 128, 2048, 512), (17, 384, 544), 64, "float32",
                          "mid-size random-init Wan transformer (CPU default)"),
    # --quick on CPU: 2 blocks, dim 256, 1,280 tokens. Smaller than cpu_mid, so the hook weighs more, not less.
    "cpu_small": BenchModel("wan21", _wan(2, 2, 128, 1024, 256), (17, 256, 256), 64, "float32",
                            "small random-init Wan transformer (--quick on CPU)"),
    # Toy sizes of both CFG layouts, for the tests.
    "tiny_wan21": BenchModel("wan21", _wan(2, 2, 16, 64, 32), (17, 64, 96), 16, "float32",
                             "toy Wan transformer (two-pass CFG), for tests"),
    "tiny_cogvideox": BenchModel("cogvideox", _cogvideox(2, 2, 16, 32, 8, (9, 64, 96), 16), (9, 64, 96), 16,
                                 "float32", "toy CogVideoX transformer (batched CFG, RoPE), for tests"),
    # The real configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers and THUDM/CogVideoX-5b transformer/config.json), random init.
    "wan21_1.3b": BenchModel("wan21", _wan(30, 12, 128, 8960, 4096), (81, 480, 832), 512, "bfloat16",
                             "Wan2.1-T2V-1.3B transformer config, 21 x 30 x 52 = 32,760 tokens"),
    "cogvideox5b": BenchModel("cogvideox", _cogvideox(42, 48, 64, 4096, 512, (49, 480, 720), 226), (49, 480, 720),
                              226, "bfloat16", "CogVideoX-5B transformer config, 13 x 30 x 45 = 17,550 tokens"),
}


@dataclass
class Plan:
    """How much to measure: in-window rounds, whole-run rounds and steps."""

    window_rounds: int
    run_rounds: int
    steps: int
    hook_rounds: int
    warmup: int = 1


def default_plan(device: torch.device, quick: bool) -> Plan:
    if quick:
        return Plan(window_rounds=3, run_rounds=3, steps=5, hook_rounds=5)
    if device.type == "cuda":
        return Plan(window_rounds=9, run_rounds=3, steps=10, hook_rounds=30)
    # CPU: a cpu_mid CFG step takes ~10 s on 2 quiet cores and single steps vary by +-5% on a shared VM, hence many
    # rounds; 5 steps keep the window's share of the run (2 of 5 = 0.4, as 20 of 50).
    return Plan(window_rounds=15, run_rounds=3, steps=5, hook_rounds=15)


# -------------------------------------------------------------------------------------------- model and inputs


def backbone_of(spec: BenchModel, name: str):
    from stas.backbones import backbone_from_config

    return backbone_from_config(SimpleNamespace(name=f"bench_{name}", family=spec.family,
                                                num_layers=spec.transformer["num_layers"],
                                                hidden_dim=spec.hidden_dim))


def build_transformer(spec: BenchModel, name: str, device: torch.device, dtype: torch.dtype, seed: int):
    """The random-init transformer of `spec` on `device` in `dtype`, with planted massive activations."""
    import diffusers

    from stas.config import PlantConfig
    from stas.tiny import plant_massive_activations

    backbone = backbone_of(spec, name)
    cls = diffusers.WanTransformer3DModel if spec.family == "wan21" else diffusers.CogVideoXTransformer3DModel
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: the 5B config would take minutes on the host
        transformer = cls(**spec.transformer)
    transformer.to(device)  # whatever a constructor placed explicitly elsewhere
    cast_like_from_pretrained(transformer, dtype)
    transformer.eval().requires_grad_(False)
    plant_massive_activations(transformer, backbone, PlantConfig())
    return transformer, backbone


def cast_like_from_pretrained(model, dtype: torch.dtype) -> None:
    """Cast parameters as from_pretrained(torch_dtype=dtype) loads them: the model class's
    `_keep_in_fp32_modules` (Wan: rope, time embedder, norms, ...) stay float32, buffers keep their dtype."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if param.is_floating_point() and not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)


@dataclass
class Inputs:
    """What the pipeline hands the transformer: initial latents, text embeddings, timesteps, RoPE tables."""

    latents: torch.Tensor  # float32, as the pipelines keep them between steps
    cond: torch.Tensor
    uncond: torch.Tensor
    sigmas: list[float]
    timesteps: list[torch.Tensor]  # per step, on the device (made before timing: no host-to-device copy inside)
    rotary: tuple | None = None


def make_inputs(spec: BenchModel, backbone, transformer, device, dtype, steps: int, seed: int) -> Inputs:
    frames, height, width = spec.video
    latent_frames = (frames - 1) // backbone.temporal_compression + 1
    size = (height // backbone.spatial_compression, width // backbone.spatial_compression)
    channels = spec.transformer["in_channels"]
    shape = (1, channels, latent_frames, *size) if backbone.latents_frame_axis == 2 else (1, latent_frames, channels, *size)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=generator).to(device)
    cond, uncond = (torch.randn(1, spec.text_tokens, spec.text_dim, generator=generator).to(device, dtype)
                    for _ in range(2))
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    timesteps = [torch.full((1,), 1000.0 * sigma, device=device) for sigma in sigmas[:-1]]
    rotary = None
    if spec.family == "cogvideox":
        from diffusers import CogVideoXPipeline

        # The pipeline's own RoPE tables, from the parts of the pipeline it reads.
        owner = SimpleNamespace(vae_scale_factor_spatial=backbone.spatial_compression, transformer=transformer)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(owner, height, width, latent_frames, device)
    return Inputs(latents, cond, uncond, sigmas, timesteps, rotary)


class Denoiser:
    """The pipelines' denoising loop around the transformer: CFG as the backbone's pipeline calls it, then an Euler
    step. `extra_pass` adds one forward pass per step on the cond inputs, as STG/PAG-style guidance does."""

    def __init__(self, transformer, backbone, inputs: Inputs, dtype, guidance_scale=5.0, extra_scale=1.0):
        self.transformer = transformer
        self.backbone = backbone
        self.inputs = inputs
        self.dtype = dtype
        self.guidance_scale = guidance_scale
        self.extra_scale = extra_scale

    def run(self, steps: range, extra_pass: bool = False) -> torch.Tensor:
        latents = self.inputs.latents
        with torch.inference_mode():
            for step in steps:
                latents = self.step(latents, step, extra_pass)
        return latents

    def step(self, latents, step: int, extra_pass: bool) -> torch.Tensor:
        timestep = self.inputs.timesteps[step]
        model_input = latents.to(self.dtype)
        if self.backbone.cfg_layout == "two_pass":
            cond = self._call(model_input, timestep, self.inputs.cond)
            uncond = self._call(model_input, timestep, self.inputs.uncond)
            perturbed = self._call(model_input, timestep, self.inputs.cond) if extra_pass else None
        else:
            texts = [self.inputs.uncond, self.inputs.cond] + ([self.inputs.cond] if extra_pass else [])
            batch = len(texts)
            predictions = self._call(torch.cat([model_input] * batch), timestep.expand(batch), torch.cat(texts))
            uncond, cond, *rest = predictions.chunk(batch)
            perturbed = rest[0] if extra_pass else None
        noise = uncond + self.guidance_scale * (cond - uncond)
        if perturbed is not None:
            noise = noise + self.extra_scale * (cond - perturbed)
        sigma, sigma_next = self.inputs.sigmas[step], self.inputs.sigmas[step + 1]
        return latents + (sigma_next - sigma) * noise

    def _call(self, hidden_states, timestep, text) -> torch.Tensor:
        extra = {} if self.inputs.rotary is None else {"image_rotary_emb": self.inputs.rotary}
        output = self.transformer(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=text,
                                  return_dict=False, **extra)[0]
        return output.float()


# ------------------------------------------------------------------------------------------------------ steering


def default_steerer(backbone):
    """The real StasSteerer with the SteerConfig defaults (the paper-like setting)."""
    from omegaconf import OmegaConf

    from stas.config import SteerConfig
    from stas.hooks import StasSteerer

    return StasSteerer(backbone, OmegaConf.structured(SteerConfig))


@contextmanager
def no_sync_allowed(device: torch.device):
    """On CUDA: any host-device synchronisation inside raises (torch.cuda.set_sync_debug_mode('error'))."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@dataclass
class Bench:
    denoiser: Denoiser
    steerer: object
    layout: object
    device: torch.device
    steps: int
    outputs: dict = field(default_factory=dict)

    def vanilla(self, steps: range, extra_pass: bool = False) -> None:
        self.outputs["extra_pass" if extra_pass else "vanilla"] = self.denoiser.run(steps, extra_pass)

    def steered(self, steps: range, check_sync: bool = True) -> None:
        # As stas.generation does: attach around the pipeline call, begin() before it.
        with self.steerer.attach(self.denoiser.transformer):
            self.steerer.begin(self.layout, self.steps, do_cfg=True)
            with no_sync_allowed(self.device) if check_sync else nullcontext():
                self.outputs["steered"] = self.denoiser.run(steps)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--model", choices=sorted(PRESETS),
                        help="transformer config (default: cpu_mid on CPU, cpu_small with --quick, wan21_1.3b on CUDA)")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer rounds and steps (and a small model)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the preset's")
    parser.add_argument("--layers", type=int, help="keep only this many blocks of the preset (smoke runs)")
    parser.add_argument("--video", type=sizes("--video", "FRAMESxHEIGHTxWIDTH", "17x384x544"), help="FRAMESxHEIGHTxWIDTH instead of the preset's video")
    parser.add_argument("--steps", type=int, help="steps of the whole sampling run (the window is 40%% of them)")
    parser.add_argument("--window-rounds", type=int, help="timed rounds of the in-window step")
    parser.add_argument("--run-rounds", type=int, help="timed rounds of the whole run")
    parser.add_argument("--hook-rounds", type=int, help="timed rounds of the hook-vs-block comparison")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    return parser.parse_args(argv)


def resolve(args) -> tuple[str, BenchModel, Plan, torch.device]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"steering_overhead: error: --device {args.device} but CUDA is not available here")
    name = args.model or ("wan21_1.3b" if device.type == "cuda" else "cpu_small" if args.quick else "cpu_mid")
    spec = PRESETS[name]
    if args.layers is not None:
        spec = replace(spec, transformer={**spec.transformer, "num_layers": args.layers})
    if args.video is not None:
        spec = replace(spec, video=args.video)
        if spec.family == "cogvideox":
            spec = replace(spec, transformer={**spec.transformer, "sample_frames": args.video[0],
                                              "sample_height": args.video[1] // 8, "sample_width": args.video[2] // 8})
    if args.dtype is not None:
        spec = replace(spec, dtype=args.dtype)
    plan = default_plan(device, args.quick)
    for key in ("steps", "window_rounds", "run_rounds", "hook_rounds"):
        if getattr(args, key) is not None:
            setattr(plan, key, getattr(args, key))
    return name, spec, plan, device


def main(argv=None) -> dict:
    return run_benchmark("steering_overhead.py", argv, parse_args(argv), measure,
                         lambda result: f"overhead_ratio={result['in_window_ratio']:.4f}")


def measure(args) -> dict:
    name, spec, plan, device = resolve(args)

    from stas.backbones import DTYPES
    from stas.config import window_steps
    from stas.layout import TokenLayout

    dtype = DTYPES[spec.dtype]
    transformer, backbone = build_transformer(spec, name, device, dtype, args.seed)
    inputs = make_inputs(spec, backbone, transformer, device, dtype, plan.steps, args.seed)
    layout = TokenLayout.for_video(backbone, spec.video[1], spec.video[2], spec.video[0])
    steerer = default_steerer(backbone)
    window = window_steps(steerer.cfg.window, plan.steps)
    if 0 not in window:
        sys.exit(f"steering_overhead: error: the default window is empty at --steps {plan.steps}; use more steps")
    bench = Bench(Denoiser(transformer, backbone, inputs, dtype), steerer, layout, device, plan.steps)
    synchronize = device_synchronizer(device)

    # Lazy caches (token indices, planted biases, CUDA kernels and allocator) fill here, outside the sync check.
    bench.steered(range(1), check_sync=False)
    one_step, all_steps = range(1), range(plan.steps)
    in_window = interleave({
        "vanilla": lambda: bench.vanilla(one_step),
        "stas": lambda: bench.steered(one_step),
        "extra_pass": lambda: bench.vanilla(one_step, extra_pass=True),
    }, repeats=plan.window_rounds, warmup=plan.warmup, synchronize=synchronize)
    record_in_window = steerer.record()
    changed = not torch.equal(bench.outputs["steered"], bench.outputs["vanilla"])
    whole_run = interleave({
        "vanilla": lambda: bench.vanilla(all_steps),
        "stas": lambda: bench.steered(all_steps),
    }, repeats=plan.run_rounds, warmup=0, synchronize=synchronize)
    record_whole_run = steerer.record()
    hook_vs_block = interleave(hook_and_block_cases(bench), repeats=plan.hook_rounds, warmup=1,
                               synchronize=synchronize)

    result = {
        "benchmark": "steering_overhead",
        "machine": machine(device),
        "model": {"preset": name, "about": spec.about, "family": spec.family, "blocks": backbone.num_layers,
                  "hidden_dim": spec.hidden_dim, "video": list(spec.video), "tokens": layout.num_tokens,
                  "grid": [layout.frames, layout.height, layout.width], "dtype": spec.dtype, "device": str(device)},
        "steer": {"window_steps": [window.start, window.stop], "of_steps": plan.steps,
                  "record_in_window_step": record_in_window, "record_whole_run": record_whole_run,
                  "steering_changed_latents": changed},
        "in_window": {k: t.as_dict() for k, t in in_window.items()},
        "whole_run": {k: t.as_dict() for k, t in whole_run.items()},
        "hook_vs_block": {k: t.as_dict() for k, t in hook_vs_block.items()},
        "ratios": {
            "in_window": in_window["stas"].ratios_to(in_window["vanilla"]),
            "extra_pass": in_window["extra_pass"].ratios_to(in_window["vanilla"]),
            "whole_run": whole_run["stas"].ratios_to(whole_run["vanilla"]),
            "hook_share_of_block": hook_vs_block["hook"].ratios_to(hook_vs_block["block"]),
        },
        "in_window_ratio": in_window["stas"].ratio_to(in_window["vanilla"]),  # the headline: ratio of medians
    }
    print(report(result, in_window, whole_run, hook_vs_block, device))
    return result


def hook_and_block_cases(bench: Bench) -> dict:
    """The steering hook alone vs the forward of the block it follows, on that block's real inputs and output.

    Both run on the last block (whose input carries the planted MAs of all blocks before it), in the first call
    of an in-window step; the block's own forward hooks (planting, steering) are bypassed. Their ratio is the
    hook's share of the block's time, free of the noise of whole steps.
    """
    from stas.hooks import LayerSteering

    transformer, backbone, steerer = bench.denoiser.transformer, bench.denoiser.backbone, bench.steerer
    index = backbone.num_layers - 1
    block = backbone.blocks(transformer)[index]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, a, k: captured.setdefault("call", (a, k)), with_kwargs=True)
    try:
        bench.vanilla(range(1))
    finally:
        handle.remove()
    args, kwargs = captured["call"]
    with torch.inference_mode():
        output = block.forward(*args, **kwargs)
    hook = LayerSteering(steerer, index, steerer.channels[index])
    steerer.begin(bench.layout, bench.steps, do_cfg=True)
    steerer.tracker.on_transformer_call(transformer, (), {})  # the step's first transformer call

    def run_block():
        with torch.inference_mode():
            block.forward(*args, **kwargs)

    def run_hook():
        with torch.inference_mode(), no_sync_allowed(bench.device):
            hook(block, args, output)

    return {"block": run_block, "hook": run_hook}


def report(result: dict, in_window: dict, whole_run: dict, hook_vs_block: dict, device: torch.device) -> str:
    model, steer, ratios = result["model"], result["steer"], result["ratios"]
    record = steer["record_in_window_step"]
    cpu_time = device.type == "cpu"
    lines = [
        f"steering overhead: {model['preset']}: {model['about']}",
        f"  {model['family']}, {model['blocks']} blocks, dim {model['hidden_dim']}, video "
        f"{'x'.join(map(str, model['video']))} -> {model['tokens']} tokens ({'x'.join(map(str, model['grid']))}), "
        f"{model['dtype']} on {model['device']}",
        f"  machine: {json.dumps(result['machine'])}",
        f"  STAS (SteerConfig defaults): window steps [{steer['window_steps'][0]}, {steer['window_steps'][1]}) of "
        f"{steer['of_steps']}, {record['tokens']} of {model['tokens']} tokens; per step {record['hook_calls']} "
        f"hook calls ({len(record['layers'])} blocks, branches {', '.join(record['branches'])}); auto-detected MA "
        f"channels per call: {record['channels_mean']:.2f} (at most {record['channels_max']}); "
        f"steering changed the latents: {steer['steering_changed_latents']}",
        "",
        f"in-window: one denoising step with CFG inside the steering window, "
        f"{len(in_window['vanilla'].seconds)} interleaved rounds",
        table([("vanilla CFG", in_window["vanilla"]), ("CFG + STAS", in_window["stas"]),
               ("CFG + one extra forward pass (STG/PAG-style)", in_window["extra_pass"])],
              baseline=in_window["vanilla"], cpu_time=cpu_time),
        "",
        f"whole run: {steer['of_steps']} steps with the default window, "
        f"{len(whole_run['vanilla'].seconds)} interleaved rounds",
        table([("vanilla CFG", whole_run["vanilla"]), ("CFG + STAS", whole_run["stas"])],
              baseline=whole_run["vanilla"], cpu_time=cpu_time),
        "",
        f"hook vs block: the steering hook alone vs the forward of the block it follows (last block, first call "
        f"of a step), {len(hook_vs_block['block'].seconds)} interleaved rounds",
        table([("block forward", hook_vs_block["block"]), ("steering hook", hook_vs_block["hook"])],
              baseline=hook_vs_block["block"], cpu_time=cpu_time),
        "",
        f"in_window_ratio={result['in_window_ratio']:.4f} (target <= 1.01 on CPU, <= 1.005 on GPU)  "
        f"whole_run_ratio={ratios['whole_run']['median']:.4f}  extra_pass_ratio={ratios['extra_pass']['median']:.4f}"
        f"  hook_share_of_block={ratios['hook_share_of_block']['median']:.5f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
