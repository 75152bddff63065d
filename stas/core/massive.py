"""Massive-activation (MA) channel detection: one definition for steering and analysis, pure tensor functions.

A channel's *peak* is its largest |value| over the tokens of a hidden state. A channel is massive when its peak
exceeds the hidden state's *threshold*, max(ratio x scale, floor), where the rule sets the scale:

  mean_abs      the mean |value| of the whole hidden state (the paper's reading: its true MA channels sit near 59x
                the mean, its "weak" ones near 6x). The default: see docs/analysis.md for why.
  channel_peak  the median channel peak (stas before 2026-11: looser, and it follows the tail of every channel, so
                it moves with the sequence length and the hidden-state scale over steps).
  sun           the median |value| of the whole hidden state, with an absolute floor (Sun et al. 2024 and
                locuslab/massive-activations: > 100 and ~1000x the median). The floor is in the model's units.

At most `max_dims` channels are kept (the largest peaks). Everything here returns device tensors of fixed shape,
so it runs inside a per-layer hook without a host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stas.core.parallel import WHOLE, TokenSplit

DETECTION_RULES = ("mean_abs", "channel_peak", "sun")
# Each rule's own threshold settings (conf/detect/<rule>.yaml holds the same values).
RULE_PRESETS = {
    "mean_abs": {"ratio": 20.0, "floor": 0.0},
    "channel_peak": {"ratio": 10.0, "floor": 0.0},
    "sun": {"ratio": 1000.0, "floor": 100.0},
}


@dataclass(frozen=True)
class Detection:
    """How massive channels are detected (the module docstring); the defaults equal the config's `detect` node."""

    rule: str = "mean_abs"
    ratio: float = RULE_PRESETS["mean_abs"]["ratio"]
    floor: float = RULE_PRESETS["mean_abs"]["floor"]
    max_dims: int = 8

    def __post_init__(self):
        if self.rule not in DETECTION_RULES:
            raise ValueError(f"detect.rule={self.rule!r} is not a rule; allowed: {', '.join(DETECTION_RULES)}")
        if not self.ratio > 0:
            raise ValueError(f"detect.ratio={self.ratio!r} must be > 0")
        if not self.floor >= 0:
            raise ValueError(f"detect.floor={self.floor!r} must be >= 0")
        if isinstance(self.max_dims, bool) or not isinstance(self.max_dims, int) or self.max_dims < 1:
            raise ValueError(f"detect.max_dims={self.max_dims!r} must be an integer >= 1")

    @classmethod
    def for_rule(cls, rule: str, **settings) -> "Detection":
        """A rule with its own preset ratio and floor, unless `settings` give them."""
        if rule not in RULE_PRESETS:
            raise ValueError(f"detect.rule={rule!r} is not a rule; allowed: {', '.join(DETECTION_RULES)}")
        return cls(rule=rule, **{**RULE_PRESETS[rule], **settings})

    @classmethod
    def of(cls, cfg) -> "Detection":
        """From a `detect` config node, as plain values (hooks never read an OmegaConf node)."""
        return cls(str(cfg.rule), float(cfg.ratio), float(cfg.floor), int(cfg.max_dims))


def channel_peaks(hidden: torch.Tensor, dim=1) -> torch.Tensor:
    """Largest |value| of `hidden` over `dim`, reading the tensor once per reduction kernel.

    On CUDA one fused reduction (infinity norm) reads the tensor once; on CPU max and -min over the contiguous
    channel axis are several times faster than the fused norm (measured in BENCHMARKS.md), and exact too.
    """
    if hidden.is_cuda:
        return torch.linalg.vector_norm(hidden, float("inf"), dim=dim)
    return torch.maximum(hidden.amax(dim=dim), hidden.amin(dim=dim).neg())


def massive_threshold(hidden: torch.Tensor, peaks: torch.Tensor, detection: Detection,
                      split: TokenSplit = WHOLE) -> torch.Tensor:
    """(G,) float32 thresholds of G hidden states: `hidden` (G, ..., D) holds each one's values (any shape after
    the first axis), `peaks` (G, D) their channel peaks. A channel of state g is massive when its peak exceeds
    threshold[g]. Under context parallelism `hidden` is this rank's share of the tokens and `peaks` are the whole
    states' (all-reduced): mean_abs sums over the ranks; sun, a median of every value, cannot run split."""
    rule = detection.rule
    if split.parallel and rule == "sun":
        raise ValueError("detect.rule=sun cannot run context-parallel: no rank holds the whole hidden state")
    if rule == "channel_peak":
        scale = peaks.float().median(dim=-1).values
    elif rule == "mean_abs":
        flat = hidden.reshape(hidden.shape[0], -1)
        # As channel_peaks: one fused read on CUDA; on CPU the 1-norm kernel is 4x slower than abs().sum()
        # (0.24 ms against 1.0 ms on a (4080 x 512) state, 2 cores).
        if flat.is_cuda:
            total = torch.linalg.vector_norm(flat, 1, dim=-1, dtype=torch.float32)
        else:
            total = flat.abs().sum(dim=-1, dtype=torch.float32)
        scale = split.sum(total) / (flat.shape[-1] * split.world)
    else:  # sun: the median of every |value|, a selection over the whole state (the costly rule)
        scale = hidden.reshape(hidden.shape[0], -1).abs().median(dim=-1).values.float()
    return torch.clamp(scale * detection.ratio, min=detection.floor)


def top_massive_channels(peaks: torch.Tensor, threshold: torch.Tensor, max_dims: int):
    """The `max_dims` channels with the largest peaks, and which of them are massive.

    `peaks` is (..., D) and `threshold` (...) for as many hidden states. Returns (indices[..., k], is_massive[..., k])
    with k = min(max_dims, D): fixed shapes, so callers can gather and scatter without knowing on the host how many
    channels qualified.
    """
    k = min(int(max_dims), peaks.shape[-1])
    values, indices = torch.topk(peaks, k)
    return indices, values.float() > threshold[..., None]


def detect_massive(hidden: torch.Tensor, detection: Detection, split: TokenSplit = WHOLE):
    """Detection on G hidden states `hidden` (G, N, D): (indices (G, k), is_massive (G, k), peaks (G, D),
    threshold (G,)); of the whole states when `hidden` is this rank's share of their tokens (`split`)."""
    peaks = split.max(channel_peaks(hidden, dim=1))
    threshold = massive_threshold(hidden, peaks, detection, split)
    indices, is_massive = top_massive_channels(peaks, threshold, detection.max_dims)
    return indices, is_massive, peaks, threshold


def massive_channel_mask(hidden: torch.Tensor, detection: Detection | None = None) -> torch.BoolTensor:
    """Boolean mask (D,) of the massive channels of one hidden state `hidden` ((B, S, D) or (S, D)).

    A channel's peak is its largest |value| over batch and tokens; the threshold comes from the whole state
    (`detection`, default: Detection(), the config's default), and at most `max_dims` channels are kept.
    """
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, S, D) or (S, D), got shape {tuple(hidden.shape)}")
    if detection is not None and not isinstance(detection, Detection):
        raise TypeError(f"detection must be a stas.core.massive.Detection (e.g. Detection.for_rule('channel_peak', "
                        f"ratio=10.0)), got {detection!r}")
    detection = detection or Detection()
    indices, is_massive, _, _ = detect_massive(hidden.reshape(1, -1, hidden.shape[-1]), detection)
    mask = torch.zeros(hidden.shape[-1], dtype=torch.bool, device=hidden.device)
    return mask.scatter(0, indices[0], is_massive[0])


CALIBRATION_KINDS = {"calibrated": "massive", "calibrated_weak": "weak", "calibrated_non_ma": "non_ma"}


def load_calibration(path, dims: str, model) -> dict:
    """Per-layer channels of one kind ('calibrated', 'calibrated_weak', 'calibrated_non_ma') from ma_dims.yaml,
    checked against `model` (a Backbone or a model config: name, num_layers, hidden_dim): {block: channels}, or,
    from the file of a model with several expert transformers (an `experts` mapping, Wan2.2-A14B), {expert name:
    {block: channels}}, each expert its own, and "*" those of `layers` (over every expert's steps) for an expert
    the file does not list. ValueError says what in the file is wrong."""
    import yaml

    model_name = model.name
    try:
        data = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise ValueError("is not an ma_dims.yaml written by stas.analyze (it needs 'model' and a 'layers' mapping "
                         "of block index to channel lists)")
    if data.get("model") != model_name:
        raise ValueError(f"was calibrated on model {data.get('model')!r}, not {model_name!r}")
    kind = CALIBRATION_KINDS[dims]
    experts = data.get("experts")
    every = _layer_channels(data["layers"], kind, model, "layers")
    if experts is None:
        return every
    if not isinstance(experts, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("layers"), dict)
                                                for entry in experts.values()):
        raise ValueError("experts must map each expert transformer's name to its own 'layers' mapping")
    return {"*": every, **{str(name): _layer_channels(entry["layers"], kind, model, f"experts.{name}.layers")
                           for name, entry in experts.items()}}


def _layer_channels(layers: dict, kind: str, model, where: str) -> dict[int, list[int]]:
    """{block: channels of `kind`} of an ma_dims.yaml `layers` mapping, checked against the model's sizes."""
    model_name, num_layers, hidden_dim = model.name, model.num_layers, model.hidden_dim
    channels = {}
    for layer, entry in layers.items():
        if not _is_index(layer) or not 0 <= layer < num_layers:
            raise ValueError(f"{where} has block {layer!r}; model {model_name!r} has blocks 0..{num_layers - 1}")
        listed = entry.get(kind, []) if isinstance(entry, dict) else None
        if not isinstance(listed, list) or not all(_is_index(channel) for channel in listed):
            raise ValueError(f"{where}.{layer}.{kind} must be a list of channel indices (integers), got {listed!r}")
        for channel in listed:
            if not 0 <= channel < hidden_dim:
                raise ValueError(f"{where}.{layer}.{kind} has channel {channel}; model {model_name!r} has channels "
                                 f"0..{hidden_dim - 1}")
        if len(set(listed)) != len(listed):
            raise ValueError(f"{where}.{layer}.{kind} lists a channel twice: {listed}")
        channels[layer] = listed
    return channels


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
