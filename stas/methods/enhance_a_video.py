"""Enhance-A-Video (Luo et al., 2502.07508): the output of every self-attention is multiplied by an enhance factor,
the cross-frame intensity of its temporal attention times (frames + weight), at least 1. Training-free, no extra
transformer pass; stas offers it as `guidance=enhance_a_video` (CFG plus this change to the transformer).

Written from the paper and its reference code (NUS-HPC-AI-Lab/Enhance-A-Video, `enhance_score` and the Wan and
CogVideoX attention processors), because diffusers has no such hook: per self-attention call, the query and key of
the video tokens after normalisation and RoPE are regrouped into one F x F temporal attention map per spatial position
and head, softmax(q k^T / sqrt(d)); the cross-frame intensity is the mean of their off-diagonal entries over the whole
call (all rows, positions and heads, as the reference code averages); the attention module's output (after its
output projection; the video tokens only, for joint text-video attention) is multiplied by the factor.

The query and key are read where the attention computes them, by catching torch's scaled_dot_product_attention
inside the self-attention modules (a TorchFunctionMode, as diffusers' own perturbed-attention hook does), so no
processor is replaced; an attention backend that does not call it (flash, sage) is refused rather than silently
left unenhanced.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook

from stas.backbones import Backbone
from stas.core.layout import TokenLayout
from stas.methods.base import Method, register_method
from stas.methods.hooks import ANNOUNCED, expert_modules

HOOK_NAME = "stas_enhance_a_video"


def enhance_factor(query: torch.Tensor, key: torch.Tensor, frames: int, weight: float) -> torch.Tensor:
    """The enhance factor (0-d float32) of one attention call. `query`, `key`: (batch, heads, tokens, head_dim) of
    the video tokens, frame-major (tokens = frames x positions)."""
    batch, heads, tokens, dim = query.shape
    positions = tokens // frames
    q, k = (x.reshape(batch, heads, frames, positions, dim).transpose(2, 3) for x in (query, key))
    temporal = ((q * dim ** -0.5) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (B, H, S, F, F)
    off_diagonal = temporal.sum(dim=(-2, -1)) - temporal.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    intensity = off_diagonal.mean() / (frames * (frames - 1))
    return (intensity * (frames + weight)).clamp(min=1.0)


class _CatchAttention(torch.overrides.TorchFunctionMode):
    """Computes the enhance factor from the query and key of the scaled_dot_product_attention calls it sees."""

    def __init__(self, video_tokens: int, frames: int, weight: float):
        super().__init__()
        self.video_tokens, self.frames, self.weight = video_tokens, frames, weight
        self.factors: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query = kwargs["query"] if "query" in kwargs else args[0]
            key = kwargs["key"] if "key" in kwargs else args[1]
            video = slice(query.shape[2] - self.video_tokens, None)  # text tokens, if any, come first
            self.factors.append(enhance_factor(query[:, :, video], key[:, :, video], self.frames, self.weight))
        return func(*args, **kwargs)


@register_method("enhance_a_video")
class EnhanceAVideo(Method):
    """Enhance-A-Video on a transformer's self-attentions, at the steps of [start, stop) x steps."""

    not_context_parallel = ("its temporal attention map is computed where attention runs, which context parallelism "
                            "splits by heads (Ulysses) or by keys (ring): each rank would compute another factor")

    def __init__(self, backbone: Backbone, weight: float = 4.0, start: float = 0.0, stop: float = 1.0):
        self.backbone, self.weight, self.start, self.stop = backbone, weight, start, stop
        self.num_steps = 0
        self.grid: tuple[int, int, int] | None = None  # of the current transformer call; None: not enhanced
        self.total: torch.Tensor | None = None  # the factors applied in the last video, summed on the device
        self.applied = 0

    def begin(self, layout: TokenLayout, num_steps: int, do_cfg: bool) -> None:
        self.num_steps, self.total, self.applied = num_steps, None, 0

    def record(self) -> dict:
        mean = float(self.total) / self.applied if self.applied else None  # one host sync, after the video
        return {"method": "enhance_a_video", "weight": self.weight, "window": [self.start, self.stop],
                "attention_calls_enhanced": self.applied, "mean_factor": mean}

    @contextmanager
    def attach(self, transformer):
        """`transformer`: one transformer or {expert name: transformer} (every expert is enhanced)."""
        experts = expert_modules(transformer).values()
        attentions = [module for expert in experts for module in self.backbone.self_attentions(expert)]
        handles = [expert.register_forward_pre_hook(self._on_transformer_call, with_kwargs=True) for expert in experts]
        for module in attentions:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_EnhanceHook(self), HOOK_NAME)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for module in attentions:
                HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)

    def _on_transformer_call(self, transformer, args, kwargs):
        call = getattr(transformer, ANNOUNCED, None)
        if call is None:
            raise RuntimeError("guidance=enhance_a_video runs in stas's own denoising loop (stas.loop), which "
                               "announces each call's step; this transformer call was not announced")
        steps = self.num_steps
        inside = int(self.start * steps) <= call.step < int(self.stop * steps)
        grid = self.backbone.grid_of_call(args, kwargs)
        self.grid = grid if inside and grid[0] > 1 else None  # one latent frame: no cross-frame attention


class _EnhanceHook(ModelHook):
    """diffusers ModelHook on a self-attention module: its output times the enhance factor of its attention call."""

    def __init__(self, method: EnhanceAVideo):
        super().__init__()
        self.method = method

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        method = self.method
        if method.grid is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        frames, height, width = method.grid
        with _CatchAttention(frames * height * width, frames, method.weight) as caught:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if len(caught.factors) != 1:
            raise RuntimeError(f"guidance=enhance_a_video reads the query and key of torch's "
                               f"scaled_dot_product_attention, which {type(module).__name__} called "
                               f"{len(caught.factors)} times: set the native attention backend")
        factor = caught.factors[0]
        method.total = factor if method.total is None else method.total + factor
        method.applied += 1
        video = method.backbone.attention_video_output(output)
        return method.backbone.with_attention_video_output(output, video * factor)
