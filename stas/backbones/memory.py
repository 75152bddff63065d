"""The transformer's memory options: diffusers' group offloading (model.group_offload) and layerwise casting
(model.layerwise_casting), and placing a pipeline on its device around them.

Both are diffusers HookRegistry hooks: they replace a module's `forward` with a wrapper (cast the weights to the
compute dtype / onload the group, call the original forward, cast back / offload). stas's hooks are torch hooks of
`_call_impl` (the transformer's forward pre-hook, the blocks' forward hooks): they run outside those wrappers, see
the same inputs and outputs as without them, and need no change (tests/backbones/test_offload.py).
"""

from __future__ import annotations

import torch

from stas.backbones.base import BackboneError

GROUP_OFFLOAD_MODES = ("none", "block_level", "leaf_level")
LAYERWISE_CASTING_DTYPES = ("none", "float8_e4m3fn", "float8_e5m2")


def apply_layerwise_casting(transformer: torch.nn.Module, storage: str) -> None:
    """Store the transformer's weights in `storage` (a float8 dtype), computing in its current dtype (model.dtype).
    diffusers leaves the layers its class lists in `_skip_layerwise_casting_patterns` (patch embedding, norms) as
    they are."""
    if storage == "none":
        return
    if storage not in LAYERWISE_CASTING_DTYPES:
        raise BackboneError(f"model.layerwise_casting={storage!r} is not allowed; "
                            f"allowed: {', '.join(LAYERWISE_CASTING_DTYPES)}")
    transformer.enable_layerwise_casting(storage_dtype=getattr(torch, storage), compute_dtype=transformer.dtype)


def apply_group_offloading(transformer: torch.nn.Module, mode: str, device: torch.device, blocks: int = 1,
                           stream: bool = False) -> None:
    """Keep the transformer's weights on the CPU and onload them to `device` a group at a time while it runs:
    `blocks` transformer blocks a group (block_level) or each leaf layer (leaf_level). `stream`: prefetch the next
    group on a side CUDA stream while the current one computes (diffusers' use_stream; CUDA only)."""
    if mode == "none":
        return
    if mode not in GROUP_OFFLOAD_MODES:
        raise BackboneError(f"model.group_offload={mode!r} is not allowed; allowed: {', '.join(GROUP_OFFLOAD_MODES)}")
    options = {"num_blocks_per_group": blocks} if mode == "block_level" else {}
    if stream:
        if device.type != "cuda":
            raise BackboneError(f"model.group_offload_stream=true needs a CUDA device (a side CUDA stream); the "
                                f"model runs on {device}; set model.group_offload_stream=false")
        options["use_stream"] = True
    transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type=mode,
                                     **options)


def place_pipeline(pipe, model_cfg, device: torch.device, experts: list | None = None) -> None:
    """Apply the model's memory options and put the pipeline on `device` (model.cpu_offload, model.group_offload);
    `experts`: the transformers they apply to (Backbone.experts; default pipe.transformer)."""
    experts = [pipe.transformer] if experts is None else experts
    for transformer in experts:
        apply_layerwise_casting(transformer, model_cfg.layerwise_casting)
    if model_cfg.group_offload != "none":
        if model_cfg.cpu_offload != "none":
            raise BackboneError(f"model.group_offload={model_cfg.group_offload} cannot be combined with "
                                f"model.cpu_offload={model_cfg.cpu_offload}; use one of them")
        for transformer in experts:
            apply_group_offloading(transformer, model_cfg.group_offload, device, model_cfg.group_offload_blocks,
                                   model_cfg.group_offload_stream)
        # The other components go to the device whole; pipe.to() would warn about the offloaded transformer.
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and all(component is not t for t in experts):
                component.to(device)
    elif model_cfg.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif model_cfg.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
