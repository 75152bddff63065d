"""Loading a model config's diffusers pipeline: its tiny twin offline, or a checkpoint from the Hugging Face cache."""

from __future__ import annotations

import os

import torch

from stas.backbones.base import DTYPES, Backbone, BackboneError
from stas.backbones.compile import compile_transformer
from stas.backbones.memory import place_pipeline
from stas.backbones.parallel import enable_context_parallel, init_distributed, parallel_size, rank_device
from stas.backbones.tiny import build_tiny_pipeline
from stas.hub import hub_reachable

def resolve_device(device: str, field: str = "model.device") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"{field}={device!r} but CUDA is not available here; use {field}=cpu or auto")
    return torch.device(device)


def start_ranks(model_cfg) -> None:
    """With model.parallel: join the torchrun launch's process group, on this rank's device (NCCL's collectives run
    on the current CUDA device), before the ranks first talk to each other."""
    if parallel_size(getattr(model_cfg, "parallel", None)) > 1:
        init_distributed(rank_device(resolve_device(model_cfg.device)))


def load_pipeline(model_cfg, backbone: Backbone):
    """The diffusers pipeline for a model config, on its device, with its memory options applied, context-parallel
    with model.parallel (under torchrun: each rank on its own GPU)."""
    parallel = getattr(model_cfg, "parallel", None)
    device = resolve_device(model_cfg.device)
    if parallel_size(parallel) > 1:
        device = rank_device(device)
    if model_cfg.hub_id is None:
        pipe = build_tiny_pipeline(model_cfg, backbone)
    else:
        pipe = _from_pretrained(model_cfg, backbone)
    check_pipeline_matches(pipe, backbone)
    enable_context_parallel(pipe, backbone, parallel, device)  # before compiling: its hooks are traced with the blocks
    # Before the memory options: accelerate's offload hooks then wrap the compiled code instead of being traced into
    # it; diffusers' group offloading runs its onload/offload outside the graphs (torch.compiler.disable).
    experts = list(backbone.experts(pipe).values())  # every expert transformer (Wan2.2-A14B: two)
    if getattr(model_cfg, "boundary_ratio", None) is not None and len(experts) < 2:
        raise BackboneError(f"model {backbone.name!r} sets model.boundary_ratio (a second expert transformer), but its "
                            "pipeline has no transformer_2; set model.boundary_ratio=null")
    wrong = [len(blocks) for blocks in map(backbone.blocks, experts[1:]) if len(blocks) != backbone.num_layers]
    if wrong:
        raise BackboneError(f"model {backbone.name!r} does not match its checkpoint: num_layers: config says "
                            f"{backbone.num_layers}, an expert transformer has {wrong[0]}")
    for transformer in experts:
        compile_transformer(transformer, model_cfg.compile)
    if model_cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if model_cfg.vae_slicing:
        pipe.vae.enable_slicing()
    place_pipeline(pipe, model_cfg, device, experts)  # layerwise casting, group / CPU offloading
    pipe.set_progress_bar_config(leave=False, desc="denoising steps")
    return pipe


def check_pipeline_matches(pipe, backbone: Backbone) -> None:
    """Fail early when a loaded pipeline contradicts its backbone description (wrong family or sizes)."""
    transformer = pipe.transformer
    try:
        blocks = backbone.blocks(transformer)
    except AttributeError:  # a transformer of another family
        blocks = None
    temporal, spatial = backbone.vae_compression_of(pipe)
    found = {
        "pipeline": type(pipe).__name__,
        "num_layers": len(blocks) if blocks is not None else None,
        "vae temporal compression": temporal,
        "vae spatial compression": spatial,
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
        kwargs.update(backbone.pretrained_components(diffusers, model_cfg, kwargs))
        pipe = pipeline_cls.from_pretrained(model_cfg.hub_id, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise BackboneError(_not_cached_message(model_cfg.hub_id, cause)) from None
    key = backbone.flow_shift_key
    if model_cfg.flow_shift is not None and key in pipe.scheduler.config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **{key: model_cfg.flow_shift})
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
