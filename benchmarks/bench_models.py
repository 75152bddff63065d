"""The transformers the overhead benchmarks time, and the denoising loop that drives them.

A preset is a diffusers transformer config (random init, planted massive activations so that detection finds real
channels) and the video it denoises. `Denoiser` is the pipelines' loop without text encoder and VAE: CFG as the
backbone's pipeline calls it (Wan: a cond call, then an uncond call per step; CogVideoX: one call on the batch
[uncond, cond]), then a flow-matching Euler update.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from stas.backbones import FAMILIES, backbone_from_config
from timing import at_least, sizes


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
        return FAMILIES[self.family].text_dim_of(self.transformer)


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
    # Toy sizes of both CFG layouts, for the tests (dim 128, as the tiny twins: room for 3 planted MA channels).
    "tiny_wan21": BenchModel("wan21", _wan(2, 2, 64, 64, 32), (17, 64, 96), 16, "float32",
                             "toy Wan transformer (two-pass CFG), for tests"),
    "tiny_cogvideox": BenchModel("cogvideox", _cogvideox(2, 2, 64, 32, 8, (9, 64, 96), 16), (9, 64, 96), 16,
                                 "float32", "toy CogVideoX transformer (batched CFG, RoPE), for tests"),
    # The real configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers and THUDM/CogVideoX-5b transformer/config.json), random init.
    "wan21_1.3b": BenchModel("wan21", _wan(30, 12, 128, 8960, 4096), (81, 480, 832), 512, "bfloat16",
                             "Wan2.1-T2V-1.3B transformer config, 21 x 30 x 52 = 32,760 tokens"),
    "cogvideox5b": BenchModel("cogvideox", _cogvideox(42, 48, 64, 4096, 512, (49, 480, 720), 226), (49, 480, 720),
                              226, "bfloat16", "CogVideoX-5B transformer config, 13 x 30 x 45 = 17,550 tokens"),
}



def backbone_of(spec: BenchModel, name: str):
    return backbone_from_config(SimpleNamespace(name=f"bench_{name}", family=spec.family,
                                                num_layers=spec.transformer["num_layers"],
                                                hidden_dim=spec.hidden_dim))


def build_transformer(spec: BenchModel, name: str, device: torch.device, dtype: torch.dtype, seed: int):
    """The random-init transformer of `spec` on `device` in `dtype`, with planted massive activations."""
    import diffusers

    from stas.config import PlantConfig
    from stas.backbones.tiny import plant_massive_activations

    backbone = backbone_of(spec, name)
    cls = getattr(diffusers, backbone.transformer_class)
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
    extra: dict  # the family's per-video transformer inputs (CogVideoX: its RoPE tables)


def make_inputs(spec: BenchModel, backbone, transformer, device, dtype, steps: int, seed: int) -> Inputs:
    frames, height, width = spec.video
    latent_frames = (frames - 1) // backbone.temporal_compression + 1
    size = (height // backbone.spatial_compression, width // backbone.spatial_compression)
    channels = spec.transformer["in_channels"]
    if backbone.latents_frame_axis == 2:
        shape = (1, channels, latent_frames, *size)
    else:
        shape = (1, latent_frames, channels, *size)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=generator).to(device)
    cond, uncond = (torch.randn(1, spec.text_tokens, spec.text_dim, generator=generator).to(device, dtype)
                    for _ in range(2))
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    timesteps = [torch.full((1,), 1000.0 * sigma, device=device) for sigma in sigmas[:-1]]
    extra = backbone.transformer_inputs(transformer, height, width, latent_frames, device)
    return Inputs(latents, cond, uncond, sigmas, timesteps, extra)


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
        with torch.inference_mode():
            # An inference tensor, like the latents of every later step (and the pipelines' own): a compiled
            # transformer would otherwise compile a second variant for the first step's input.
            latents = self.inputs.latents.clone()
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
        output = self.transformer(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=text,
                                  return_dict=False, **self.inputs.extra)[0]
        return output.float()




def add_model_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    """The options that choose the transformer and its video: --device, --model, --dtype, --layers, --video, --seed."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--model", choices=sorted(PRESETS), help=f"transformer config (default: {default_help})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the preset's")
    parser.add_argument("--layers", type=at_least(1), help="keep only this many blocks of the preset (smoke runs)")
    parser.add_argument("--video", type=sizes("--video", "FRAMESxHEIGHTxWIDTH", "17x384x544"),
                        help="FRAMESxHEIGHTxWIDTH instead of the preset's video")
    parser.add_argument("--seed", type=int, default=0)


def select_model(args, script: str) -> tuple[str, BenchModel, torch.device]:
    """The preset the model options name, with --layers/--video/--dtype applied, and the device: the preset
    defaults to wan21_1.3b on CUDA, cpu_small with --quick, cpu_mid otherwise."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: error: --device {args.device} but CUDA is not available here")
    name = args.model or ("wan21_1.3b" if device.type == "cuda" else "cpu_small" if args.quick else "cpu_mid")
    spec = PRESETS[name]
    if args.layers is not None:
        spec = replace(spec, transformer={**spec.transformer, "num_layers": args.layers})
    if args.video is not None:
        spec = replace(spec, video=args.video,
                       transformer=FAMILIES[spec.family].transformer_config_for_video(spec.transformer, *args.video))
    if args.dtype is not None:
        spec = replace(spec, dtype=args.dtype)
    return name, spec, device


def model_record(name: str, spec: BenchModel, backbone, layout, device: torch.device) -> dict:
    """The JSON record of what was timed."""
    return {"preset": name, "about": spec.about, "family": spec.family, "blocks": backbone.num_layers,
            "hidden_dim": spec.hidden_dim, "video": list(spec.video), "tokens": layout.num_tokens,
            "grid": [layout.frames, layout.height, layout.width], "dtype": spec.dtype, "device": str(device)}


def describe(model: dict) -> str:
    """Two report lines on the model of `model_record`."""
    return (f"{model['preset']}: {model['about']}\n  {model['family']}, {model['blocks']} blocks, dim "
            f"{model['hidden_dim']}, video {'x'.join(map(str, model['video']))} -> {model['tokens']} tokens "
            f"({'x'.join(map(str, model['grid']))}), {model['dtype']} on {model['device']}")
