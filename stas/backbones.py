"""Backbone descriptions and pipeline loading.

A `Backbone` says everything the steering and analysis code need to know about a model, so that they never
special-case model names: where the transformer blocks are, how the VAE compresses time and space, the patch size,
how classifier-free guidance calls the transformer, and what a block returns.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from stas.errors import UserError
from stas.hub import hub_reachable

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass(frozen=True)
class Family:
    """What every model of one diffusers family shares."""

    pipeline: str  # diffusers pipeline class
    blocks_attr: str  # attribute of the transformer holding the block list
    temporal_compression: int
    spatial_compression: int
    patch: tuple[int, int, int]  # (time, height, width) patch of the transformer
    cfg_layout: str  # "two_pass": cond call then uncond call per step; "batched": one call on [uncond, cond]
    block_returns_tuple: bool  # CogVideoX blocks return (video tokens, text tokens); Wan blocks return the video tokens
    text_tokens: str  # how text enters the blocks; steering and capture only ever see the video tokens
    latents_frame_axis: int  # Wan latents are (B, C, F, H, W), CogVideoX latents (B, F, C, H, W)
    expand_timesteps: bool = False  # Wan2.2-TI2V: a timestep per token


_WAN = Family(
    pipeline="WanPipeline",
    blocks_attr="blocks",
    temporal_compression=4,
    spatial_compression=8,
    patch=(1, 2, 2),
    cfg_layout="two_pass",
    block_returns_tuple=False,
    text_tokens="cross-attention only (encoder_hidden_states), never in the block output",
    latents_frame_axis=2,
)
FAMILIES = {
    "wan21": _WAN,
    # Wan2.2-TI2V: a residual VAE compressing 16x in space, and a timestep per token.
    "wan22": replace(_WAN, spatial_compression=16, expand_timesteps=True),
    "cogvideox": Family(
        pipeline="CogVideoXPipeline",
        blocks_attr="transformer_blocks",
        temporal_compression=4,
        spatial_compression=8,
        patch=(1, 2, 2),
        cfg_layout="batched",
        block_returns_tuple=True,
        text_tokens="separate stream (encoder_hidden_states), joined with video tokens only inside attention",
        latents_frame_axis=1,
    ),
}

CFG_BRANCHES = ("cond", "uncond")


class BackboneError(UserError, RuntimeError):
    """A backbone that cannot be described or loaded; the message says what to do."""


@dataclass(frozen=True)
class Backbone(Family):
    """One model: its family's description plus its own name and sizes."""

    name: str = ""
    family: str = ""
    num_layers: int = 0
    hidden_dim: int = 0

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        return self.spatial_compression * self.patch[1], self.spatial_compression * self.patch[2]

    def video_problems(self, height: int, width: int, num_frames: int) -> list[str]:
        """Why this backbone cannot take a video of this size (empty when it can)."""
        problems = []
        tc = self.temporal_compression
        if num_frames < 1 or (num_frames - 1) % tc:
            problems.append(f"num_frames={num_frames} must be {tc}k+1 (e.g. {tc * 4 + 1}) for a VAE compressing time {tc}x")
        for field, value, step in (("height", height, self.pixels_per_token[0]), ("width", width, self.pixels_per_token[1])):
            if value < step or value % step:
                problems.append(f"{field}={value} must be a positive multiple of {step} for {self.name} "
                                f"({self.spatial_compression}x VAE x patch {self.patch[1]})")
        return problems

    def latent_grid(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        problems = self.video_problems(height, width, num_frames)
        if problems:
            raise BackboneError("; ".join(problems))
        frames = (num_frames - 1) // self.temporal_compression + 1
        return frames // self.patch[0], height // self.pixels_per_token[0], width // self.pixels_per_token[1]

    def grid_of_latents(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """(frames, height, width) token grid of the latents a transformer call receives."""
        frames, (height, width) = latents.shape[self.latents_frame_axis], latents.shape[-2:]
        return frames // self.patch[0], height // self.patch[1], width // self.patch[2]

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return getattr(transformer, self.blocks_attr)

    def video_tokens(self, block_output):
        """The (B, S, D) video-token hidden states inside a block's output."""
        return block_output[0] if self.block_returns_tuple else block_output

    def calls_per_step(self, do_cfg: bool) -> int:
        return 2 if do_cfg and self.cfg_layout == "two_pass" else 1

    def branch_rows(self, branch: str, call_in_step: int, batch: int, do_cfg: bool) -> slice | None:
        """Rows of a transformer call's batch that belong to `branch`, or None when the call has none of them.

        Two-pass CFG calls the transformer with the cond batch, then the uncond batch; batched CFG calls it once on
        torch.cat([uncond, cond]). Without CFG every call is cond.
        """
        if not do_cfg:
            return slice(0, batch) if branch == "cond" else None
        if self.cfg_layout == "two_pass":
            return slice(0, batch) if CFG_BRANCHES[call_in_step] == branch else None
        half = batch // 2
        return slice(half, batch) if branch == "cond" else slice(0, half)


def runs_cfg(guidance_scale: float) -> bool:
    """Whether the pipelines run classifier-free guidance (Wan's and CogVideoX's do when guidance_scale > 1)."""
    return guidance_scale > 1.0


def backbone_from_config(model_cfg) -> Backbone:
    if model_cfg.family not in FAMILIES:
        raise BackboneError(f"model.family={model_cfg.family!r} is unknown; allowed: {', '.join(FAMILIES)}")
    return Backbone(
        **asdict(FAMILIES[model_cfg.family]),
        name=model_cfg.name,
        family=model_cfg.family,
        num_layers=int(model_cfg.num_layers),
        hidden_dim=int(model_cfg.hidden_dim),
    )


def available_models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def get_backbone(name: str) -> Backbone:
    """The backbone of a model config in conf/model/ (e.g. 'wan21_1.3b')."""
    from stas.config import load_group_option

    return backbone_from_config(load_group_option("model", name))


# ---------------------------------------------------------------------------------------------------------- loading

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPILE_MODES = ("none", "regional", "full")


def resolve_device(device: str, field: str = "model.device") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"{field}={device!r} but CUDA is not available here; use {field}=cpu or auto")
    return torch.device(device)


def load_pipeline(model_cfg, backbone: Backbone):
    """The diffusers pipeline for a model config, on its device, with its memory options applied."""
    device = resolve_device(model_cfg.device)
    if model_cfg.hub_id is None:
        from stas.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(model_cfg, backbone)
    else:
        pipe = _from_pretrained(model_cfg, backbone)
    check_pipeline_matches(pipe, backbone)
    # Before offloading: accelerate's offload hooks then wrap the compiled code instead of being traced into it.
    compile_transformer(pipe.transformer, model_cfg.compile)
    if model_cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if model_cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if model_cfg.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif model_cfg.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(leave=False, desc="denoising steps")
    return pipe


def compile_transformer(transformer: torch.nn.Module, mode: str, **options) -> None:
    """torch.compile a diffusers transformer in place: `mode` none, regional or full (model.compile).

    regional: diffusers' `compile_repeated_blocks` (the transformer blocks, one graph shared by all of them: the
    recommended mode, compiling in seconds rather than minutes). full: the transformer's `forward`, blocks included.
    Both leave the transformer's own forward pre-hooks eager, on purpose: stas's hooks (stas.hooks, stas.capture,
    the tiny twins' planter) count the denoising calls and write their per-call device state there, outside the
    graph; `transformer.compile()` would compile `_call_impl`, those pre-hooks with it, and a host counter inside a
    graph recompiles at every call. The block hooks are traced into the graphs (they read nothing that changes
    from call to call on the host). `options` go to torch.compile."""
    if mode not in COMPILE_MODES:
        raise BackboneError(f"model.compile={mode!r} is not allowed; allowed: {', '.join(COMPILE_MODES)}")
    if mode == "regional":
        if not getattr(transformer, "_repeated_blocks", None):
            import diffusers

            raise BackboneError(
                f"model.compile=regional needs diffusers' regional compilation, and {type(transformer).__name__} "
                f"declares no `_repeated_blocks` in diffusers {diffusers.__version__}: use model.compile=full"
            )
        transformer.compile_repeated_blocks(**options)
    elif mode == "full":
        transformer.forward = torch.compile(transformer.forward, **options)


def compile_counts() -> dict:
    """torch.compile's totals in this process so far (since the last torch._dynamo.reset()): graphs compiled,
    recompiles (compiles of a frame after its first: a guard failed, e.g. a host value read in traced code changed)
    and graph breaks. Compare two readings to see what a run added; on any device."""
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters

    per_frame = getattr(convert_frame, "FRAME_COMPILE_COUNTER", {})  # compiles per frame (dynamo internals)
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "recompiles": sum(max(0, count - 1) for count in per_frame.values()),
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def check_pipeline_matches(pipe, backbone: Backbone) -> None:
    """Fail early when a loaded pipeline contradicts its backbone description (wrong family or sizes)."""
    transformer = pipe.transformer
    blocks = getattr(transformer, backbone.blocks_attr, None)
    found = {
        "pipeline": type(pipe).__name__,
        "num_layers": len(blocks) if blocks is not None else None,
        "vae temporal compression": pipe.vae_scale_factor_temporal,
        "vae spatial compression": pipe.vae_scale_factor_spatial,
    }
    expected = {
        "pipeline": backbone.pipeline,
        "num_layers": backbone.num_layers,
        "vae temporal compression": backbone.temporal_compression,
        "vae spatial compression": backbone.spatial_compression,
    }
    wrong = [f"{k}: config says {expected[k]}, checkpoint has {found[k]}" for k in expected if expected[k] != found[k]]
    if wrong:
        raise BackboneError(f"model {backbone.name!r} does not match its checkpoint: " + "; ".join(wrong))


def _from_pretrained(model_cfg, backbone: Backbone):
    from huggingface_hub import snapshot_download

    # With the hub unreachable the client would retry every file for half a minute before failing; the cache alone
    # answers at once, and before diffusers is even imported (seconds).
    offline = not hub_reachable()
    common = {"revision": model_cfg.revision, "local_files_only": offline}
    if offline:
        try:
            snapshot_download(model_cfg.hub_id, **common)
        except OSError:
            why = (f"no snapshot of revision {model_cfg.revision or 'main'} in the cache, and the hub is offline "
                   "(HF_HUB_OFFLINE) or unreachable")
            raise BackboneError(_not_cached_message(model_cfg.hub_id, why)) from None
    import diffusers

    pipeline_cls = getattr(diffusers, backbone.pipeline)
    kwargs = {"torch_dtype": DTYPES[model_cfg.dtype], **common}
    try:
        if backbone.family in ("wan21", "wan22"):
            # Wan's VAE is published for float32 decoding; bf16 decoding visibly degrades frames.
            vae_dtype = DTYPES[model_cfg.vae_dtype or "float32"]
            kwargs["vae"] = diffusers.AutoencoderKLWan.from_pretrained(
                model_cfg.hub_id, subfolder="vae", torch_dtype=vae_dtype, **common
            )
        pipe = pipeline_cls.from_pretrained(model_cfg.hub_id, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise BackboneError(_not_cached_message(model_cfg.hub_id, cause)) from None
    if model_cfg.flow_shift is not None and "flow_shift" in pipe.scheduler.config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=model_cfg.flow_shift)
    return pipe


def _not_cached_message(hub_id: str, cause: str) -> str:
    from huggingface_hub import constants

    return (
        f"could not load {hub_id!r}: it is not in the local Hugging Face cache and the hub could not be reached.\n"
        f"  looked in: {constants.HF_HUB_CACHE} (HF_HOME={os.environ.get('HF_HOME', constants.HF_HOME)})\n"
        f"  to pre-download on a machine with network access: hf download {hub_id}\n"
        f"  (or huggingface-cli download {hub_id}); then copy the cache or point HF_HOME at it, "
        f"and set HF_HUB_OFFLINE=1 on machines without network.\n"
        f"  cause: {cause}"
    )
