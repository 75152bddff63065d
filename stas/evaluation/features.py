"""Per-frame features of a video: downsampled pixels (no weights), DINO ViT-B/16 and CLIP ViT-B/32 embeddings.

DINO and CLIP see frames exactly as VBench's subject_consistency and background_consistency see them
(vbench/utils.py: load_video gives float 0..255 frames, then dino_transform / clip_transform):
- DINO: resize the shorter side to 224 (bilinear, antialias=False, no crop), /255, ImageNet mean/std; the CLS token
  of timm's `vit_base_patch16_224.dino`, with DINO's own positional-embedding interpolation for non-square frames.
- CLIP: resize the shorter side to 224 (bicubic, antialias=False), centre crop 224, /255, CLIP mean/std; the image
  embedding of open_clip's `ViT-B-32-quickgelu` (the OpenAI architecture) with OpenAI's weights.
Frames go through in batches, on the GPU when there is one.

Weights come from the standard caches (see `FEATURE_MODELS`); offline with none found, `WeightsMissing` says what is
missing, where it looked and how to get it. `random_weights` builds the real architecture with seeded random weights
(for tests: the values then mean nothing, and the summary says so).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from stas.evaluation.base import EvaluatorUnavailable
from stas.hub import hub_reachable

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
DINO_PATCH = 16


class WeightsMissing(EvaluatorUnavailable):
    """A feature model's weights are neither configured nor cached, and cannot be downloaded."""


def vbench_cache_dir() -> Path:
    """VBench's weights cache: $VBENCH_CACHE_DIR, else ~/.cache/vbench (as vbench/utils.py decides it)."""
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


def torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir())


@dataclass(frozen=True)
class FeatureModel:
    """Where the weights of one feature model may already be on disk, and where they come from."""

    evaluator: str
    description: str
    hf_repo: str  # the Hugging Face repo timm / open_clip download from
    hf_files: tuple[str, ...]  # file names they store there, in the order they look for them
    release_url: str  # the original release file (the format VBench caches)
    other_files: Callable[[], list[Path]]  # caches of other tools holding the same weights

    def cached(self) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        for name in self.hf_files:
            found = try_to_load_from_cache(self.hf_repo, name)
            if isinstance(found, str):
                return Path(found)
        return next((path for path in self.other_files() if path.is_file()), None)


FEATURE_MODELS = {
    "dino": FeatureModel(
        evaluator="dino",
        description="DINO ViT-B/16 (timm 'vit_base_patch16_224.dino')",
        hf_repo="timm/vit_base_patch16_224.dino",
        hf_files=("model.safetensors", "pytorch_model.bin"),
        release_url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        other_files=lambda: [vbench_cache_dir() / "dino_model" / "dino_vitbase16_pretrain.pth",
                             torch_hub_dir() / "checkpoints" / "dino_vitbase16_pretrain.pth"],
    ),
    "clip": FeatureModel(
        evaluator="clip",
        description="CLIP ViT-B/32 with OpenAI weights (open_clip 'ViT-B-32-quickgelu', pretrained='openai')",
        hf_repo="timm/vit_base_patch32_clip_224.openai",
        hf_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        release_url="https://openaipublic.azureedge.net/clip/models/"
                    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        other_files=lambda: [vbench_cache_dir() / "clip_model" / "ViT-B-32.pt",
                             Path.home() / ".cache" / "clip" / "ViT-B-32.pt"],
    ),
}


def missing_message(model: FeatureModel, why: str) -> str:
    from huggingface_hub import constants

    places = [f"the Hugging Face cache {constants.HF_HUB_CACHE} ({model.hf_repo})"]
    places += [str(path) for path in model.other_files()]
    return (
        f"the weights of {model.description} are not available: {why}\n"
        f"  looked in: eval.{model.evaluator}.checkpoint (unset); " + "; ".join(places) + "\n"
        f"  to fix, either: on a machine with network run `hf download {model.hf_repo}` and copy the Hugging Face "
        f"cache here (HF_HOME), or download {model.release_url} and set eval.{model.evaluator}.checkpoint=<that file>"
    )


def resolve_weights(model: FeatureModel, checkpoint: str | None) -> Path | None:
    """The weights file to load; None means the library downloads into the Hugging Face cache itself."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsMissing(f"eval.{model.evaluator}.checkpoint={checkpoint!r}: no such file")
        return path
    cached = model.cached()
    if cached is not None:
        return cached
    if not hub_reachable():
        raise WeightsMissing(missing_message(model, "nothing cached, and the hub is offline (HF_HUB_OFFLINE) or "
                                                    "unreachable"))
    return None


@contextmanager
def quiet_logging():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def seeded_random_init(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The real architecture with random weights, the same ones every time, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


# ------------------------------------------------------------------------------------------------------------ DINO


def dino_position_embedding(pos_embed: torch.Tensor, image_size: tuple[int, int], patch: int = DINO_PATCH):
    """DINO's positional embedding for an image of `image_size` (H, W) pixels.

    facebookresearch/dino (VisionTransformer.interpolate_pos_encoding) resizes the patch grid bicubically with the
    scale factor (H // patch + 0.1) / grid, not to a target size; timm's own resampling gives other values, so
    VBench's numbers on non-square frames need this rule. Square 224 x 224 input keeps the table as it is.
    """
    height, width = image_size
    grid = math.sqrt(pos_embed.shape[1] - 1)
    if (height // patch) * (width // patch) == pos_embed.shape[1] - 1 and height == width:
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed[:, 1:].reshape(1, int(grid), int(grid), dim).permute(0, 3, 1, 2)
    scale = ((height // patch + 0.1) / grid, (width // patch + 0.1) / grid)
    table = F.interpolate(table, scale_factor=scale, mode="bicubic")
    return torch.cat([pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


class DinoEncoder(torch.nn.Module):
    """CLS features of DINO ViT-B/16 for images of any size (timm's modules, DINO's positional interpolation)."""

    def __init__(self, weights: Path | None, random_weights: bool = False):
        super().__init__()
        import timm

        def build(pretrained: bool, **overlay):
            # weight_init="skip": no random init of weights that are loaded right after
            return timm.create_model("vit_base_patch16_224.dino", pretrained=pretrained, dynamic_img_size=True,
                                     pretrained_cfg_overlay=overlay or None,
                                     weight_init="skip" if pretrained else "")

        if random_weights:
            self.vit = seeded_random_init(lambda: build(False))
        elif weights is None:
            self.vit = build(True)
        else:
            self.vit = build(True, file=str(weights))
        self.vit.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        height, width = images.shape[-2:]
        # DINO's strided patch convolution drops the pixels past the last whole patch; timm's asserts instead.
        whole = images[..., : height - height % DINO_PATCH, : width - width % DINO_PATCH]
        tokens = vit.patch_embed(whole)  # (B, h, w, C): dynamic_img_size keeps the grid
        batch, _, _, dim = tokens.shape
        tokens = torch.cat([vit.cls_token.expand(batch, -1, -1), tokens.reshape(batch, -1, dim)], dim=1)
        tokens = tokens + dino_position_embedding(vit.pos_embed, (height, width))
        tokens = vit.blocks(vit.norm_pre(tokens))
        return vit.norm(tokens)[:, 0]


def dino_preprocess(frames: torch.Tensor) -> torch.Tensor:
    """VBench's dino_transform(224) on (T, 3, H, W) float frames in 0..255."""
    from torchvision.transforms import functional as TF

    frames = TF.resize(frames, IMAGE_SIZE, antialias=False)
    return TF.normalize(frames / 255.0, DINO_MEAN, DINO_STD)


# ------------------------------------------------------------------------------------------------------------ CLIP


class ClipEncoder(torch.nn.Module):
    """Image embeddings of CLIP ViT-B/32 (open_clip's OpenAI architecture): what clip's encode_image returns."""

    def __init__(self, weights: Path | None, random_weights: bool = False):
        super().__init__()
        import open_clip

        if weights is None and not random_weights:
            model = open_clip.create_model("ViT-B-32-quickgelu", pretrained="openai")
        else:
            with quiet_logging():  # open_clip warns "initialized randomly" before we load the weights
                model = seeded_random_init(lambda: open_clip.create_model("ViT-B-32-quickgelu", pretrained=None))
            if weights is not None:
                load_clip_weights(model, weights)
        self.visual = model.visual.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def load_clip_weights(model, path: Path) -> None:
    """Load an open_clip checkpoint or OpenAI's TorchScript release (the ViT-B-32.pt that VBench and clip cache)."""
    import open_clip

    try:
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:  # not TorchScript: a plain state dict or safetensors file
        open_clip.load_checkpoint(model, str(path))
        return
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    model.load_state_dict(state)


def clip_preprocess(frames: torch.Tensor) -> torch.Tensor:
    """VBench's clip_transform(224) on (T, 3, H, W) float frames in 0..255."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    frames = TF.resize(frames, IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC, antialias=False)
    frames = TF.center_crop(frames, IMAGE_SIZE)
    return TF.normalize(frames / 255.0, CLIP_MEAN, CLIP_STD)


# -------------------------------------------------------------------------------------------------------- features


class FrameFeatures:
    """frames (T, H, W, 3) uint8 -> features (T, C) on the CPU, computed in batches of frames on `device`."""

    def __init__(self, encoder: Callable, preprocess: Callable, device: torch.device, batch_size: int, note: str = ""):
        self.encoder = encoder
        self.preprocess = preprocess
        self.device = device
        self.batch_size = batch_size
        self.note = note  # said in the summary, e.g. that the weights are random

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        out = []
        for start in range(0, video.shape[0], self.batch_size):
            batch = video[start:start + self.batch_size].to(self.device, torch.float32)
            out.append(self.encoder(self.preprocess(batch)).float())
        return torch.cat(out).cpu()


def pixel_features(size: int) -> Callable:
    """Frames average-pooled to size x size, flattened and centred per frame: their cosine similarity is the
    normalised cross-correlation of the frames' coarse intensities. Needs no weights."""

    def encode(frames: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(frames / 255.0, size).flatten(1)
        return pooled - pooled.mean(dim=1, keepdim=True)

    return encode


@functools.lru_cache(maxsize=4)
def load_encoder(name: str, weights: Path | None, random_weights: bool, device: str) -> torch.nn.Module:
    """A DINO or CLIP encoder on `device`; kept for the process, so evaluating several runs loads it once."""
    encoder_class = {"dino": DinoEncoder, "clip": ClipEncoder}[name]
    return encoder_class(weights, random_weights=random_weights).to(device)


def make_features(name: str, eval_cfg, device: torch.device) -> FrameFeatures:
    """The feature extractor an evaluator name stands for; raises WeightsMissing when its weights are not here."""
    if name == "pixel":
        return FrameFeatures(pixel_features(eval_cfg.pixel.size), lambda x: x, device, eval_cfg.batch_size)
    options = eval_cfg[name]
    model = FEATURE_MODELS[name]
    weights = None if options.random_weights else resolve_weights(model, options.checkpoint)
    try:
        encoder = load_encoder(name, weights, options.random_weights, str(device))
    except Exception as err:  # a download from the hub that failed: the library's own error types vary
        if weights is not None or options.random_weights:
            raise
        raise WeightsMissing(missing_message(model, f"the download failed ({type(err).__name__}: {err})")) from None
    preprocess = {"dino": dino_preprocess, "clip": clip_preprocess}[name]
    note = (f"RANDOM weights (eval.{name}.random_weights=true): for tests only, the values mean nothing"
            if options.random_weights else f"weights: {weights or model.hf_repo}")
    return FrameFeatures(encoder, preprocess, device, eval_cfg.batch_size, note)
