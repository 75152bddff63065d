"""Context parallelism (model.parallel): one video's token sequence split across the ranks of a torchrun launch.

diffusers (0.42) runs a transformer context-parallel with `enable_parallelism(config=ContextParallelConfig(...))`:
Ulysses attention (an all-to-all swaps the sequence split for a split of the heads around each attention) and ring
attention (every rank attends its queries to each rank's keys and values in turn, merging by log-sum-exp), over a
(ring x ulysses) device mesh of every rank. The model's `_cp_plan` says where the sequence is split and gathered; a
family declares the module stas's hooks can rely on (`Backbone.context_parallel_split`, Wan's `blocks.0`), and one
without it refuses the option. Every rank runs the whole pipeline with the same inputs (same seeds) and gets the
same frames: rank 0 writes the run's outputs, the others only take their part in each transformer call.

What diffusers itself allows, read from its code and tried here (CPU, gloo):
  - Ulysses needs the attention heads divisible by ulysses_degree; the equal split needs the video tokens divisible
    by ring_degree x ulysses_degree (diffusers asserts it; stas refuses the size first).
  - ring attention needs an attention backend that returns the log-sum-exp: diffusers' native SDPA backend raises
    ("Native attention does not support return_lse=True"); those that do (_native_cudnn, _native_flash, flash,
    sage) are CUDA-only and bf16/fp16. Ring therefore needs CUDA; Ulysses runs on CPU (gloo) too.
  - Without an accelerator diffusers computes `rank % torch.accelerator.device_count()` (a ZeroDivisionError): on
    CPU the count is read as 1 while the mesh is set up (the device it computes is only recorded).
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from unittest import mock

import torch

from stas.backbones.base import Backbone, BackboneError
from stas.core.layout import TokenLayout
from stas.core.parallel import WHOLE, TokenSplit
from stas.errors import ConfigError

RING_BACKEND = "_native_cudnn"  # the attention backend ring attention gets when model.parallel names none
LSE_DTYPES = (torch.bfloat16, torch.float16)


def parallel_degrees(parallel) -> tuple[int, int]:
    """(ring_degree, ulysses_degree) of a model.parallel node; (1, 1) without one."""
    if parallel is None:
        return 1, 1
    return int(parallel.ring_degree), int(parallel.ulysses_degree)


def parallel_size(parallel) -> int:
    """How many ranks model.parallel splits a video across (1: no context parallelism)."""
    ring, ulysses = parallel_degrees(parallel)
    return ring * ulysses


def check_parallel(model_cfg, backbone: Backbone, detect_rule: str, guidance: str, change=None) -> None:
    """Refuse (ConfigError, at start-up) a model.parallel that cannot run this model, video size, detection or
    guidance (`change`: the stas.methods.Method class the guidance applies to the transformer, if any)."""
    problems = parallel_problems(model_cfg, backbone)
    if problems:
        raise ConfigError("; ".join(problems))
    if parallel_size(model_cfg.parallel) == 1:
        return
    if detect_rule == "sun":
        raise ConfigError("detect.rule=sun cannot run with model.parallel: its scale is the median of every value of "
                          "the hidden state, which no rank holds whole; use detect=mean_abs or detect=channel_peak")
    reason = getattr(change, "not_context_parallel", None)
    if reason:
        raise ConfigError(f"guidance={guidance} cannot run with model.parallel: {reason}")


def parallel_problems(model_cfg, backbone: Backbone) -> list[str]:
    """Why model.parallel cannot run this model at its video size (empty when it can), before anything loads."""
    parallel, dtype, device = model_cfg.parallel, model_cfg.dtype, model_cfg.device
    ring, ulysses = parallel_degrees(parallel)
    if ring < 1 or ulysses < 1:
        return [f"model.parallel.ring_degree={ring} and ulysses_degree={ulysses} must be >= 1"]
    size = ring * ulysses
    if size == 1:
        return []
    if backbone.context_parallel_split is None:
        return [f"model.parallel (ring_degree={ring}, ulysses_degree={ulysses}): the {backbone.family} family "
                f"({backbone.transformer_class}) has no context-parallel plan in diffusers that stas supports; "
                "context parallelism runs the Wan family (model.parallel.ring_degree=1 ulysses_degree=1 here)"]
    problems = []
    if str(device).startswith("cuda:"):
        problems.append(f"model.device={device} with model.parallel: each rank runs on cuda:<LOCAL_RANK>, the GPU "
                        "torchrun gives it; use model.device=cuda or auto")
    if parallel.attention_backend:
        from diffusers.models.attention_dispatch import AttentionBackendName

        names = [backend.value for backend in AttentionBackendName]
        if parallel.attention_backend not in names:
            problems.append(f"model.parallel.attention_backend={parallel.attention_backend!r} is not a diffusers "
                            f"attention backend; allowed: {', '.join(names)}")
    num_tokens = TokenLayout.for_video(backbone, model_cfg.height, model_cfg.width, model_cfg.num_frames).num_tokens
    if num_tokens % size:
        problems.append(f"model.parallel splits the {num_tokens} video tokens of a {backbone.name} video of this "
                        f"size into {size} equal chunks (ring_degree x ulysses_degree): choose a height, width or "
                        f"num_frames whose token count is a multiple of {size}")
    if ring > 1:
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            problems.append(f"model.parallel.ring_degree={ring} needs CUDA: diffusers' ring attention needs an "
                            "attention backend that returns the log-sum-exp, and all of them are CUDA-only (its native "
                            "SDPA backend, the one that runs on CPU, does not); use model.parallel.ulysses_degree "
                            "on CPU")
        if not parallel.attention_backend and dtype not in ("bfloat16", "float16"):
            problems.append(f"model.parallel.ring_degree={ring} with model.dtype={dtype}: ring attention's default "
                            f"backend {RING_BACKEND} takes bfloat16 or float16; use model.dtype=bfloat16 or name a "
                            "backend in model.parallel.attention_backend")
    return problems


def init_distributed(device: torch.device) -> None:
    """The default process group of a torchrun launch (NCCL on CUDA, gloo on CPU), unless one exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise BackboneError("model.parallel runs one process per rank: launch with torchrun, e.g. "
                            "torchrun --nproc_per_node=2 -m stas.run model=wan21_1.3b model.parallel.ulysses_degree=2")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)


def rank_device(device: torch.device) -> torch.device:
    """A rank's device: `cuda` (no index) becomes cuda:LOCAL_RANK, the GPU torchrun gave this rank."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def enable_context_parallel(pipe, backbone: Backbone, parallel, device: torch.device) -> None:
    """diffusers' context parallelism on every expert transformer of `pipe` (transformer, and transformer_2 of
    Wan2.2-A14B), over one (ring x ulysses) mesh of all ranks; nothing when model.parallel asks for one rank."""
    ring, ulysses = parallel_degrees(parallel)
    if ring * ulysses == 1:
        return
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    init_distributed(device)
    if dist.get_world_size() != ring * ulysses:
        raise BackboneError(f"model.parallel asks for ring_degree x ulysses_degree = {ring * ulysses} ranks, but "
                            f"torchrun started {dist.get_world_size()}: use torchrun --nproc_per_node={ring * ulysses}")
    mesh = init_device_mesh(device.type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    backend = parallel.attention_backend or (RING_BACKEND if ring > 1 else None)
    for transformer in backbone.experts(pipe).values():
        _check_plan(transformer, backbone, ulysses)
        if backend:
            transformer.set_attention_backend(backend)
        with _accelerator_count():
            transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses,
                                                                        mesh=mesh))


def _check_plan(transformer, backbone: Backbone, ulysses: int) -> None:
    """The transformer's diffusers plan splits the video tokens where the family says, and Ulysses divides its heads."""
    split = backbone.context_parallel_split
    plan = getattr(transformer, "_cp_plan", None) or {}
    entry = plan.get(split, {}) if split else {}
    hidden = entry.get("hidden_states") if isinstance(entry, dict) else None
    if hidden is None or hidden.split_dim != 1:
        import diffusers

        raise BackboneError(f"model.parallel: {type(transformer).__name__} in diffusers {diffusers.__version__} has "
                            f"no context-parallel plan splitting the video tokens at {split!r} (found: "
                            f"{sorted(plan) or 'none'}); context parallelism is not available for {backbone.name}")
    heads = int(transformer.config.num_attention_heads)
    if heads % ulysses:
        raise BackboneError(f"model.parallel.ulysses_degree={ulysses} must divide the {heads} attention heads of "
                            f"{backbone.name} (Ulysses attention gives each rank heads/ulysses_degree heads)")


@contextmanager
def _accelerator_count():
    """diffusers' `enable_parallelism` computes `rank % torch.accelerator.device_count()`: 0 without an accelerator;
    read it as 1 there (the device it computes is only recorded, never used)."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch("torch.accelerator.device_count", return_value=1):
        yield


def token_split(backbone: Backbone, transformer) -> TokenSplit:
    """Which tokens this rank's blocks of `transformer` see: its context-parallel chunk, or the whole sequence."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return WHOLE
    if backbone.context_parallel_split is None:
        raise BackboneError(f"{type(transformer).__name__} runs context-parallel, but stas does not know where the "
                            f"{backbone.family} family's plan splits the video tokens: its hooks cannot run on it")
    import torch.distributed as dist

    group = cp._flattened_mesh.get_group()
    cached = getattr(cp, "_stas_token_split", None)
    if cached is None:  # one object per transformer: hooks key their per-call state on it
        cached = cp._stas_token_split = TokenSplit(dist.get_rank(group), dist.get_world_size(group), group)
    return cached


def is_leader() -> bool:
    """Whether this process writes a run's outputs: rank 0 of a torchrun launch, or the only process."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def from_leader(value):
    """Rank 0's `value` on every rank (a picklable object; one process: `value` itself)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
