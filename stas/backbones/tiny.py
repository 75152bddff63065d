"""Tiny twins: random-init models built offline from the same diffusers classes as the real backbones.

They run the exact code path of the real models (pipeline, transformer, VAE, scheduler, T5 text encoder) at toy
sizes, on CPU, in seconds. Random weights have no massive activations, so the twins carry *planted* ones: forward
hooks registered at build time set a few channels of chosen blocks to `magnitude x profile(token) x scale`, where
the profile follows the latent chunking (largest on first-frame tokens, smaller on boundary tokens, small on interior
tokens) and `scale` is the mean |value| of the block output's other channels, per batch row. Sized relative to the
hidden state, the planted channels stay massive however the random state grows over the steps and blocks, under
every detection rule that reads the state's scale, in every family. Analysis, calibration and steering all have
something real to find; the planted channels, magnitudes and profile are in the model config (`model.tiny.plant`).
A twin with two expert transformers (tiny_wan22_a14b) plants in both, the second with `model.tiny.plant_2` where given.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from stas.backbones.base import Backbone
from stas.backbones.parallel import token_split
from stas.core.layout import TokenLayout
from stas.core.parallel import WHOLE

# A character-level tokenizer: every prompt maps to its own token sequence, with nothing to download.
_VOCAB_CHARS = string.ascii_lowercase + string.digits + string.punctuation + " "
_SPECIAL = {"<pad>": 0, "</s>": 1, "<unk>": 2}


def build_tokenizer(max_length: int, words: Sequence[str] = (), specials: tuple[str, ...] = (),
                    bos: str | None = None):
    """The character-level tokenizer, plus whole-token `words` (matched before the characters, longest first, case
    kept) and `specials`; `bos`: a special token put in front of every text instead of `</s>` at its end (Llama)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = dict(_SPECIAL)
    for char in _VOCAB_CHARS:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.decoder = decoders.BPEDecoder()
    specials = (*specials, bos) if bos else specials
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in specials])
    tokenizer.add_tokens([AddedToken(word, normalized=False) for word in dict.fromkeys(words)])
    template = (f"{bos} $A", bos) if bos else ("$A </s>", "</s>")
    tokenizer.post_processor = TemplateProcessing(single=template[0],
                                                  special_tokens=[(template[1], tokenizer.token_to_id(template[1]))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_text_encoder(tiny, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=tiny.text_dim,
        d_kv=8,
        d_ff=2 * tiny.text_dim,
        num_layers=1,
        num_heads=tiny.text_dim // 8,
        pad_token_id=0,
        eos_token_id=1,
    )
    # eval(): a freshly built model is in training mode and T5's dropout would make outputs random.
    return T5EncoderModel(config).eval()


def build_tiny_pipeline(model_cfg, backbone: Backbone):
    """A seeded random-init pipeline of the backbone's family, with planted massive activations."""
    import diffusers

    tiny = model_cfg.tiny
    torch.manual_seed(tiny.seed)
    text = backbone.tiny_text_components(tiny, model_cfg)
    if text is None:
        tokenizer = build_tokenizer(model_cfg.max_sequence_length)
        text = dict(tokenizer=tokenizer, text_encoder=build_text_encoder(tiny, len(tokenizer)))
    vae, transformer, scheduler = backbone.tiny_components(diffusers, tiny, model_cfg)
    experts = backbone.tiny_expert_components(diffusers, tiny, model_cfg)
    pipe = backbone.tiny_pipeline(diffusers, dict(**text, vae=vae, transformer=transformer, scheduler=scheduler,
                                                  **experts))
    # Every expert gets planted MAs: the first `plant`, the others `plant_2` where given (their own channels).
    for index, expert in enumerate(backbone.experts(pipe).values()):
        plant = tiny.plant if index == 0 or getattr(tiny, "plant_2", None) is None else tiny.plant_2
        if plant.enabled:
            plant_massive_activations(expert, backbone, plant)
    return pipe


# --------------------------------------------------------------------------------------------- planted activations


def planted_profile(layout: TokenLayout, plant) -> torch.Tensor:
    """Per-token scale of the planted activations: first frame > boundary > interior."""
    profile = torch.full((layout.num_tokens,), float(plant.interior))
    profile[layout.mask("boundary", plant.boundary_width, plant.boundary_unit)] = float(plant.boundary)
    profile[layout.mask("first_frame")] = float(plant.first_frame)
    return profile


class MassiveActivationPlanter:
    """Plants massive activations in chosen blocks of a tiny transformer (see the module docstring).

    The transformer's pre-hook (eager, outside any compiled region) reads the token grid of the call and puts the
    per-token profile x magnitude on the call's device; the block hooks (`write`) only scale and set it, so compiled blocks
    see one graph. Context-parallel, a block sees one rank's chunk of the tokens: the profile is cut to it, and the
    scale is the whole state's, computed on the gathered state exactly as one process computes it (the twins are
    tiny), so that every rank plants what one process plants."""

    def __init__(self, backbone: Backbone, plant):
        self.backbone = backbone
        # The plant config as plain values: hooks never read an OmegaConf node.
        self.plant = SimpleNamespace(interior=float(plant.interior), boundary=float(plant.boundary),
                                     first_frame=float(plant.first_frame), boundary_width=int(plant.boundary_width),
                                     boundary_unit=str(plant.boundary_unit))
        self.channels = torch.tensor(list(plant.channels), dtype=torch.long)
        self.magnitudes = torch.tensor(list(plant.magnitudes), dtype=torch.float32)
        self.layout: TokenLayout | None = None
        self.bias: torch.Tensor | None = None  # (S, channels) float32 on the call's device
        self.device_channels: torch.Tensor | None = None
        self.split = WHOLE
        self._bias_cache: dict = {}

    def read_grid(self, transformer, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        self.layout = TokenLayout(*self.backbone.grid_of_call(args, kwargs))
        self.split = token_split(self.backbone, transformer)
        key = (self.layout, latents.device, self.split)
        if key not in self._bias_cache:
            profile = self.split.local(planted_profile(self.layout, self.plant), self.layout.num_tokens, dim=0)
            with torch.inference_mode(False):  # kept across calls, inside inference_mode or not
                self._bias_cache[key] = ((profile[:, None] * self.magnitudes[None, :]).to(latents.device),
                                         self.channels.to(latents.device))
        self.bias, self.device_channels = self._bias_cache[key]

    def write(self, block, args, output):
        hidden = self.backbone.video_tokens(output)
        channels = self.device_channels
        whole = self.split.gather(hidden, dim=1)  # the state of every token (one process: `hidden` itself)
        # The other channels' mean |value| per row: all values minus the planted ones (no gather of the others).
        total = torch.linalg.vector_norm(whole, 1, dim=(1, 2), dtype=torch.float32)
        planted = torch.linalg.vector_norm(whole[:, :, channels], 1, dim=(1, 2), dtype=torch.float32)
        scale = (total - planted) / (whole.shape[1] * (whole.shape[2] - channels.shape[0]))
        hidden[:, :, channels] = (scale[:, None, None] * self.bias).to(hidden.dtype)
        return output


def plant_massive_activations(transformer, backbone: Backbone, plant) -> MassiveActivationPlanter:
    if len(plant.channels) != len(plant.magnitudes):
        raise ValueError(
            f"model.tiny.plant.channels ({len(plant.channels)}) and magnitudes ({len(plant.magnitudes)}) must pair up"
        )
    planter = MassiveActivationPlanter(backbone, plant)
    transformer.register_forward_pre_hook(planter.read_grid, with_kwargs=True)
    blocks = backbone.blocks(transformer)
    layers = range(len(blocks)) if plant.layers is None else plant.layers
    for index in layers:
        blocks[index].register_forward_hook(planter.write)
    return planter
