"""Frame-similarity evaluators: `pixel`, `dino`, `clip`.

Each turns a video's frames into per-frame features (coarse pixels, DINO ViT-B/16 or CLIP ViT-B/32 embeddings:
stas.evaluation.features) and scores them with VBench's consistency formula and the chunk-aware similarities
(stas.evaluation.similarity). Video-level; every successful scoring writes `consistency`. Their rows carry
`settings` (pixel size or weights, temporal compression): rows of other settings are scored again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from stas.errors import ConfigError
from stas.evaluation.base import Evaluator, Measurements, Scorer, register
from stas.evaluation.features import FrameFeatures, make_features
from stas.evaluation.records import Video
from stas.evaluation.similarity import similarity_metrics


@dataclass
class PixelEvalConfig:
    size: int = 32  # frames average-pooled to size x size before comparing them


@dataclass
class FeatureModelConfig:
    checkpoint: Optional[str] = None  # a local weights file; default: the standard caches (docs/evaluation.md)
    random_weights: bool = False  # tests only: the real architecture with seeded random weights


class FrameSimilarity(Evaluator):
    """Per-frame features, then VBench's consistency and the chunk-aware similarities of one video."""

    done_metric = "consistency"

    def __init__(self, context):
        super().__init__(context)
        self.features: FrameFeatures | None = None

    def feature_settings(self) -> str:
        raise NotImplementedError

    def settings(self) -> str:
        return f"{self.feature_settings()}; temporal_compression {self.context.temporal_compression}"

    def prepare(self, scorer: Scorer) -> None:
        """Load the feature model (WeightsMissing, an EvaluatorUnavailable, when its weights are not here)."""
        self.features = make_features(self.name, self.context.options, self.context.device)
        if self.features.note:
            self.context.notes.append(f"{self.name}: {self.features.note}")

    def score_video(self, scorer: Scorer, video: Video, frames) -> Measurements:
        return similarity_metrics(self.features(frames), self.context.temporal_compression)


@register
class Pixel(FrameSimilarity):
    """Coarse frames (average-pooled, centred): no weights, runs everywhere."""

    name = "pixel"
    config = PixelEvalConfig
    bounds = {"size": (1, 1024)}

    def feature_settings(self) -> str:
        return f"pixel size {self.options.size}"


class PretrainedFeatures(FrameSimilarity):
    """A pretrained image model's features; its weights from eval.<name>.checkpoint or the standard caches."""

    config = FeatureModelConfig

    @classmethod
    def check_config(cls, options, evaluation) -> None:
        if options.checkpoint and not Path(options.checkpoint).expanduser().is_file():
            raise ConfigError(f"eval.{cls.name}.checkpoint={options.checkpoint!r}: no such file")

    def feature_settings(self) -> str:
        if self.options.random_weights:
            return "random weights"
        return f"weights {self.options.checkpoint}" if self.options.checkpoint else "pretrained weights"


@register
class Dino(PretrainedFeatures):
    """DINO ViT-B/16 CLS features: `consistency` is VBench's subject consistency."""

    name = "dino"


@register
class Clip(PretrainedFeatures):
    """CLIP ViT-B/32 image embeddings: `consistency` is VBench's background consistency."""

    name = "clip"
