"""Structured configs: one dataclass schema per config group, registered in Hydra's ConfigStore.

Command-line overrides are checked against these schemas before Hydra composes (`check_override`: a key that is not
a field, a value of the wrong type); `validate` then checks values (ranges, finite numbers) and cross-field rules at
start-up, before any model is loaded, and raises `ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
import shutil
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from stas.errors import ConfigError  # defined in stas.errors, importable from here too

from stas.backbones import COMPILE_MODES, CONF_DIR, DTYPES, FAMILIES, Backbone, backbone_from_config, runs_cfg
from stas.layout import BOUNDARY_UNITS, LayoutError, TokenLayout, parse_targets
from stas.massive import CALIBRATION_KINDS, load_calibration
from stas.steering import RULES_WITH_ALPHA, check_rule

EXPERIMENTS_DIR = CONF_DIR.parent / "experiments"
BRANCHES = ("cond", "uncond", "both")
DIMS_MODES = ("auto", "all", "calibrated", "calibrated_weak", "calibrated_non_ma")
WINDOW_UNITS = ("fraction", "steps")
OFFLOAD_MODES = ("none", "model", "sequential")
EVALUATORS = ("pixel", "dino", "clip", "vbench")
VBENCH_MODES = ("custom_input", "vbench_standard")


# ------------------------------------------------------------------------------------------------------- schemas


@dataclass
class PlantConfig:
    enabled: bool = True
    channels: List[int] = field(default_factory=lambda: [5, 17, 26])
    magnitudes: List[float] = field(default_factory=lambda: [60.0, -45.0, 30.0])
    first_frame: float = 1.0
    boundary: float = 0.5
    interior: float = 0.1
    boundary_width: int = 1
    boundary_unit: str = "rows"
    layers: Optional[List[int]] = None


@dataclass
class TinyConfig:
    seed: int = 0
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 64
    text_dim: int = 32
    vae_base_dim: int = 3
    plant: PlantConfig = field(default_factory=PlantConfig)


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING
    hub_id: Optional[str] = None  # None: a tiny twin built offline from `tiny`
    revision: Optional[str] = None
    tiny: Optional[TinyConfig] = None
    num_layers: int = MISSING
    hidden_dim: int = MISSING
    height: int = MISSING
    width: int = MISSING
    num_frames: int = MISSING
    steps: int = MISSING
    guidance_scale: float = MISSING
    flow_shift: Optional[float] = None
    use_dynamic_cfg: bool = False
    fps: int = MISSING
    negative_prompt: str = ""
    max_sequence_length: int = 226
    dtype: str = "bfloat16"
    vae_dtype: Optional[str] = None
    device: str = "auto"
    cpu_offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    compile: str = "none"  # none | regional (the blocks, diffusers' compile_repeated_blocks) | full (forward)


@dataclass
class WindowConfig:
    start: float = 0.0
    end: float = 0.4
    unit: str = "fraction"  # fraction of the number of steps, or step indices; the window is [start, end)


@dataclass
class SteerConfig:
    name: str = "stas"
    enabled: bool = True
    rule: str = "max_scaled"
    alpha: float = 1.0
    strength: float = 1.0
    targets: str = "first_frame+boundary"
    boundary_width: int = 1
    boundary_unit: str = "rows"
    dims: Any = "auto"  # auto | all | calibrated | calibrated_weak | calibrated_non_ma | [channel, ...]
    ratio: float = 10.0
    max_dims: int = 4
    calibration: Optional[str] = None  # ma_dims.yaml written by stas.analyze
    layers: Any = "all"  # all | [index, ...] | "start:end"
    window: WindowConfig = field(default_factory=WindowConfig)
    branches: str = "both"


@dataclass
class PromptsConfig:
    source: str = "demo"  # demo | list | file | vbench
    prompts: List[str] = field(default_factory=list)
    path: Optional[str] = None
    samples_per_prompt: int = 1
    limit: Optional[int] = None
    vbench_dimensions: Optional[List[str]] = None


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "stas"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    log_videos: int = 4
    init_timeout: int = 120


@dataclass
class ShardConfig:
    # Only what is given here shards a run (None: 0 of 1): under a Slurm launcher $SLURM_ARRAY_TASK_ID numbers the
    # sweep's cells, not shards, so it is never read (the sbatch scripts pass shard.index/count explicitly).
    index: Optional[int] = None
    count: Optional[int] = None


@dataclass
class FeatureModelConfig:
    checkpoint: Optional[str] = None  # a local weights file; default: the standard caches (docs/evaluation.md)
    random_weights: bool = False  # tests only: the real architecture with seeded random weights


@dataclass
class PixelEvalConfig:
    size: int = 32  # frames average-pooled to size x size before comparing them


@dataclass
class VBenchEvalConfig:
    mode: str = "custom_input"  # custom_input | vbench_standard
    dimensions: List[str] = field(default_factory=list)  # VBench dimension names, e.g. [temporal_flickering]
    python: Optional[str] = None  # the interpreter that has vbench installed; default: this one
    cache_dir: Optional[str] = None  # VBench's weights cache; default: $VBENCH_CACHE_DIR, else ~/.cache/vbench
    full_info: Optional[str] = None  # default: the VBench_full_info.json shipped with vbench
    timeout: Optional[int] = None  # seconds per dimension


@dataclass
class EvalConfig:
    evaluators: List[str] = field(default_factory=list)  # pixel | dino | clip | vbench
    device: str = "auto"
    batch_size: int = 32  # frames per forward pass of dino / clip
    temporal_compression: Optional[int] = None  # latent chunking of the chunk-aware metrics; default: the model's VAE
    pixel: PixelEvalConfig = field(default_factory=PixelEvalConfig)
    dino: FeatureModelConfig = field(default_factory=FeatureModelConfig)
    clip: FeatureModelConfig = field(default_factory=FeatureModelConfig)
    vbench: VBenchEvalConfig = field(default_factory=VBenchEvalConfig)


ANALYSIS_PLOTS = ("tokens", "ratios", "channels", "profile")


@dataclass
class AnalysisConfig:
    """What stas.analyze captures, detects, calibrates and plots (see docs/analysis.md)."""

    layers: Any = "all"  # blocks captured: all | [index, ...] | "start:end"
    steps: Any = "all"  # denoising steps captured: all | [index, ...] | "start:end"
    # (block, step) pairs whose per-token MA magnitude is kept (S floats each): the sequence plot, within-frame
    # profile and period. None: the middle captured block; the first captured step and the one nearest 10% of steps.
    profile_layers: Any = None
    profile_steps: Any = None
    ratio: float = 10.0  # a channel is massive when its peak |value| exceeds ratio x the median channel peak
    max_dims: int = 8  # channels ranked per hidden state (the massive ones among them are kept)
    min_frequency: float = 0.5  # calibration: massive in at least this fraction of a block's observations
    weak: int = 4  # calibration: the next-ranked channels that do not qualify, per block
    non_ma: int = 4  # calibration: ordinary channels nearest the median peak, per block
    plots: List[str] = field(default_factory=lambda: list(ANALYSIS_PLOTS))
    compare: List[str] = field(default_factory=list)  # analysis run directories to put side by side (no sampling)


@dataclass
class StasConfig:
    model: ModelConfig = MISSING
    steer: SteerConfig = MISSING
    prompts: PromptsConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    shard: ShardConfig = field(default_factory=ShardConfig)
    experiment: Optional[str] = None
    name: str = "default"  # experiment name: W&B group, output folder
    seed: int = 0
    progress: bool = True
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


SCHEMAS = {
    "model": ModelConfig,
    "steer": SteerConfig,
    "prompts": PromptsConfig,
    "eval": EvalConfig,
    "logger": LoggerConfig,
    "analysis": AnalysisConfig,
}


def path_safe(text: str) -> str:
    """A sweep's override_dirname as one directory name: a group override such as steer/window=late has a '/'."""
    return str(text).replace("/", ".")


def repo_path(relative: str) -> str:
    """`${repo:experiments/x.yaml}`: a file shipped with stas, wherever the command runs from."""
    return str(CONF_DIR.parent / relative)


def register_configs() -> None:
    """Register the root schema (conf/config.yaml lists it first, so every group is merged onto its dataclass)."""
    for name, resolver in (("path_safe", path_safe), ("repo", repo_path)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    store = ConfigStore.instance()
    store.store(name="stas_schema", node=StasConfig)
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        # Experiments live in experiments/ (one file each, `# @package _global_`); registering them here makes
        # them the `experiment` group without a second copy under conf/.
        store.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")


def load_group_option(group: str, name: str) -> DictConfig:
    """One option of a config group, merged onto its schema (used outside Hydra, e.g. by get_backbone)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
        raise ConfigError(f"{group}={name!r} is not an option; available: {options}")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), node)


# ---------------------------------------------------------------------------------------------------- validation


SEED_MAX = 2**63 - 1  # int64, what torch.Generator, numpy and W&B all hold exactly


@dataclass(frozen=True)
class Bounds:
    """The range a numeric field must lie in: [low, high], or (low, high] with low_open."""

    low: int
    high: int
    low_open: bool = False

    def __contains__(self, value) -> bool:
        if not (isinstance(value, int) or math.isfinite(value)):
            return False
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}]"


# Ranges of numeric fields (documented in README, "Configuration"); every other float must at least be finite.
NUMERIC_BOUNDS = {
    "seed": Bounds(0, SEED_MAX),  # negative seeds would alias: manual_seed(-1) is manual_seed(2**64 - 1)
    "model.steps": Bounds(1, 10000),
    "model.guidance_scale": Bounds(0, 100),
    "model.flow_shift": Bounds(0.01, 100),  # far below the published 1-12 the schedule collapses (black video)
    "model.fps": Bounds(1, 240),
    "model.max_sequence_length": Bounds(1, 4096),
    "model.tiny.seed": Bounds(0, SEED_MAX),
    "steer.strength": Bounds(0, 1, low_open=True),  # 0 would leave every value as it is
    "steer.ratio": Bounds(0, 10000),
    **{f"model.tiny.{size}": Bounds(1, 4096) for size in ("num_layers", "num_heads", "head_dim", "ffn_dim", "text_dim",
                                                         "vae_base_dim")},
    "model.tiny.plant.first_frame": Bounds(0, 100),
    "model.tiny.plant.boundary": Bounds(0, 100),
    "model.tiny.plant.interior": Bounds(0, 100),
    "eval.batch_size": Bounds(1, 4096),
    "eval.temporal_compression": Bounds(1, 64),
    "eval.pixel.size": Bounds(1, 1024),
    "logger.log_videos": Bounds(0, 100000),
}
PLANT_MAGNITUDE_MAX = 1e4  # planted MAs far beyond this overflow the tiny twins' activations
ALPHA_BOUNDS = Bounds(0, 100, low_open=True)  # for the rules that use alpha


def _kind_of(value) -> str:
    return "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a finite number"


def _in_bounds(path: str, value, bounds: Bounds) -> None:
    if value not in bounds:
        raise ConfigError(f"{path}={value!r} must be {_kind_of(value)} in {bounds}")


def _check_numbers(settings: DictConfig, unused: tuple[str, ...]) -> None:
    """Every bounded field in its range, and every other float of the config finite (NaN passes any `<` check and
    inf reaches the model); the top-level nodes in `unused` are not used by this run and not checked."""
    for path, bounds in NUMERIC_BOUNDS.items():
        value = OmegaConf.select(settings, path)
        if value is not None and path.split(".")[0] not in unused:
            _in_bounds(path, value, bounds)

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"{path}={node!r} must be a finite number")

    used = OmegaConf.masked_copy(settings, [key for key in settings if key not in unused])
    walk(OmegaConf.to_container(used, resolve=True), "")


def _allowed(path: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def _at_least(path: str, value, minimum, what: str = "") -> None:
    if value is None or value < minimum:
        raise ConfigError(f"{path}={value!r} must be >= {minimum}{what}")


def validate_model(model) -> Backbone:
    _allowed("model.family", model.family, FAMILIES)
    if model.hub_id is None and model.tiny is None:
        raise ConfigError(f"model {model.name!r} needs model.hub_id (a real checkpoint) or model.tiny (a tiny twin)")
    _allowed("model.dtype", model.dtype, DTYPES)
    if model.vae_dtype is not None:
        _allowed("model.vae_dtype", model.vae_dtype, DTYPES)
    _allowed("model.cpu_offload", model.cpu_offload, OFFLOAD_MODES)
    _allowed("model.compile", model.compile, COMPILE_MODES)
    if model.compile != "none" and model.cpu_offload == "sequential":
        raise ConfigError(f"model.compile={model.compile} cannot be combined with model.cpu_offload=sequential (its "
                          "hooks move every layer's weights inside the compiled code); use model.cpu_offload=model "
                          "or model.compile=none")
    _check_device("model.device", model.device)
    _at_least("model.num_layers", model.num_layers, 1)
    backbone = backbone_from_config(model)
    problems = backbone.video_problems(model.height, model.width, model.num_frames)
    if problems:
        raise ConfigError("model." + "; model.".join(problems))
    if model.tiny is not None:
        tiny = model.tiny
        if (model.num_layers, model.hidden_dim) != (tiny.num_layers, tiny.num_heads * tiny.head_dim):
            raise ConfigError(
                f"model.num_layers={model.num_layers} and model.hidden_dim={model.hidden_dim} must equal "
                f"model.tiny.num_layers={tiny.num_layers} and num_heads*head_dim={tiny.num_heads * tiny.head_dim}"
            )
        plant = tiny.plant
        if plant.enabled:
            for channel in plant.channels:
                if not 0 <= channel < model.hidden_dim:
                    raise ConfigError(
                        f"model.tiny.plant.channels contains {channel}; allowed: 0..{model.hidden_dim - 1}"
                    )
            for magnitude in plant.magnitudes:
                if not abs(magnitude) <= PLANT_MAGNITUDE_MAX:
                    raise ConfigError(f"model.tiny.plant.magnitudes contains {magnitude!r}; allowed: finite numbers in "
                                      f"[-{PLANT_MAGNITUDE_MAX:g}, {PLANT_MAGNITUDE_MAX:g}]")
            if len(plant.channels) != len(plant.magnitudes):
                raise ConfigError("model.tiny.plant.channels and model.tiny.plant.magnitudes must have equal length")
    return backbone


def select_indices(value, count: int, path: str, what: str = "block") -> list[int]:
    """The indices 0..count-1 that a selection names: 'all', a list of indices, or a 'start:end' range."""
    if value == "all" or value is None:
        return list(range(count))
    if isinstance(value, str):
        try:
            start, end = (int(x) if x else None for x in value.split(":"))
        except ValueError:
            raise ConfigError(f"{path}={value!r} is not allowed; allowed: all, a list of indices, 'start:end'")
        indices = list(range(count))[slice(start, end)]
        if not indices:
            raise ConfigError(f"{path}={value!r} selects no {what} of {count}")
        return indices
    if isinstance(value, int):
        value = [value]
    indices = [int(x) for x in value]
    if not indices:
        raise ConfigError(f"{path}=[] selects nothing; give at least one {what} index (0..{count - 1}) or 'all'")
    for index in indices:
        if not 0 <= index < count:
            raise ConfigError(f"{path} contains {index}; the model has {what}s 0..{count - 1}")
    return sorted(set(indices))


def steered_layers(layers, num_layers: int) -> list[int]:
    """The block indices a `steer.layers` value names: 'all', a list of indices, or a 'start:end' range."""
    return select_indices(layers, num_layers, "steer.layers")


def window_steps(window, num_steps: int) -> range:
    """The denoising step indices [start, end) of a steering window; fractions are rounded to steps."""
    _allowed("steer.window.unit", window.unit, WINDOW_UNITS)
    start, end = window.start, window.end
    if not start < end:
        raise ConfigError(f"steer.window start={start!r} must be < end={end!r}")
    if window.unit == "fraction":
        if not (0 <= start and end <= 1):
            raise ConfigError(f"steer.window=[{start}, {end}) must lie within [0, 1] as fractions of the steps")
        return range(round(start * num_steps), round(end * num_steps))
    if start != int(start) or end != int(end) or start < 0 or end > num_steps:
        raise ConfigError(
            f"steer.window=[{start}, {end}) must be whole step indices within [0, {num_steps}] (model.steps={num_steps})"
        )
    return range(int(start), int(end))


def validate_steer(steer, model, backbone: Backbone) -> None:
    if not steer.enabled:
        return
    try:
        check_rule(steer.rule, steer.alpha, steer.strength)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if steer.rule in RULES_WITH_ALPHA:
        _in_bounds("steer.alpha", steer.alpha, ALPHA_BOUNDS)
    if steer.rule == "scale" and steer.alpha == 1:
        raise ConfigError("steer.alpha=1.0 with steer.rule=scale leaves every value as it is (target = alpha x h): "
                          "STAS would steer nothing; use steer=none for a vanilla run")
    try:
        parse_targets(steer.targets)
    except LayoutError as err:
        raise ConfigError(f"steer.targets={steer.targets!r}: {err}") from None
    _allowed("steer.boundary_unit", steer.boundary_unit, BOUNDARY_UNITS)
    _allowed("steer.branches", steer.branches, BRANCHES)
    if steer.branches == "uncond" and not runs_cfg(model.guidance_scale):
        raise ConfigError(f"steer.branches=uncond, but model.guidance_scale={model.guidance_scale!r} runs no "
                          "classifier-free guidance, so there is no uncond branch: STAS would steer nothing")
    layout = TokenLayout(*backbone.latent_grid(model.height, model.width, model.num_frames))
    try:
        layout.boundary_span(steer.boundary_width, steer.boundary_unit)
    except LayoutError as err:
        raise ConfigError(f"steer.boundary_width={steer.boundary_width!r}: {err}") from None
    if not layout.mask(steer.targets, steer.boundary_width, steer.boundary_unit).any():
        raise ConfigError(f"steer.targets={steer.targets!r} selects no token of a {layout.frames}-latent-frame video "
                          f"(model.num_frames={model.num_frames}): STAS would steer nothing")
    layers = steered_layers(steer.layers, model.num_layers)
    if not window_steps(steer.window, model.steps):
        window = steer.window
        raise ConfigError(f"steer.window=[{window.start}, {window.end}) ({window.unit}) of model.steps={model.steps} "
                          "contains no step: STAS would steer nothing; widen the window or raise model.steps")
    _at_least("steer.max_dims", steer.max_dims, 1)
    dims = steer.dims
    if isinstance(dims, str):
        _allowed("steer.dims", dims, DIMS_MODES)
        calibration = steering_calibration(steer, model)
        if calibration is not None and not any(calibration.get(layer) for layer in layers):
            raise ConfigError(f"steer.calibration={steer.calibration!r}: lists no {CALIBRATION_KINDS[dims]} channel "
                              f"for the steered blocks {layers}: STAS would steer nothing")
    else:
        channels = list(dims)
        if not channels or not all(isinstance(c, int) and 0 <= c < model.hidden_dim for c in channels):
            raise ConfigError(
                f"steer.dims={channels!r}: a channel list must be non-empty integers in 0..{model.hidden_dim - 1}"
            )


def steering_calibration(steer, model) -> dict[int, list[int]] | None:
    """The per-layer channels a calibrated `steer.dims` steers, read from steer.calibration and checked against the
    model (blocks, channel range, types); None for the other dims."""
    dims = steer.dims
    if not (isinstance(dims, str) and dims.startswith("calibrated")):
        return None
    if not steer.calibration:
        raise ConfigError(f"steer.dims={dims} needs steer.calibration=<path to ma_dims.yaml> (written by stas.analyze)")
    if not Path(steer.calibration).is_file():
        raise ConfigError(f"steer.calibration={steer.calibration!r}: no such file (run stas.analyze first)")
    try:
        return load_calibration(steer.calibration, dims, model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"steer.calibration={steer.calibration!r}: {err}") from None


@dataclass(frozen=True)
class AnalysisSelection:
    """The blocks and steps stas.analyze captures, and the (block, step) pairs whose per-token magnitudes it keeps."""

    layers: tuple[int, ...]
    steps: tuple[int, ...]
    profile: tuple[tuple[int, int], ...]


def analysis_selection(analysis, num_layers: int, num_steps: int) -> AnalysisSelection:
    """Resolve and check the `analysis` selections against a model of `num_layers` blocks and `num_steps` steps."""
    layers = select_indices(analysis.layers, num_layers, "analysis.layers")
    steps = select_indices(analysis.steps, num_steps, "analysis.steps", what="step")
    if analysis.profile_layers is None:
        profile_layers = [layers[len(layers) // 2]]
    else:
        profile_layers = select_indices(analysis.profile_layers, num_layers, "analysis.profile_layers")
    if analysis.profile_steps is None:
        early = min(steps, key=lambda step: abs(step - round(0.1 * num_steps)))
        profile_steps = sorted({steps[0], early})
    else:
        profile_steps = select_indices(analysis.profile_steps, num_steps, "analysis.profile_steps", what="step")
    for path, chosen, captured in (("analysis.profile_layers", profile_layers, layers),
                                   ("analysis.profile_steps", profile_steps, steps)):
        outside = sorted(set(chosen) - set(captured))
        if outside:
            kind = path.split("_")[1]
            raise ConfigError(f"{path} contains {outside}, which analysis.{kind} does not capture "
                              f"(captured: {captured}); capture them or choose among them")
    return AnalysisSelection(tuple(layers), tuple(steps),
                             tuple((layer, step) for layer in profile_layers for step in profile_steps))


def validate_analysis(analysis, model) -> AnalysisSelection:
    selection = analysis_selection(analysis, model.num_layers, model.steps)
    if not analysis.ratio > 0:
        raise ConfigError(f"analysis.ratio={analysis.ratio!r} must be > 0")
    _at_least("analysis.max_dims", analysis.max_dims, 1)
    if not 0 < analysis.min_frequency <= 1:
        raise ConfigError(f"analysis.min_frequency={analysis.min_frequency!r} must lie in (0, 1]")
    _at_least("analysis.weak", analysis.weak, 0)
    _at_least("analysis.non_ma", analysis.non_ma, 0)
    for plot in analysis.plots:
        _allowed("analysis.plots entry", plot, ANALYSIS_PLOTS)
    return selection


def validate_prompts(prompts) -> None:
    _allowed("prompts.source", prompts.source, ("demo", "list", "file", "vbench"))
    if prompts.source == "file" and not prompts.path:
        raise ConfigError("prompts=file needs prompts.path=<text file, one prompt a line>")
    _at_least("prompts.samples_per_prompt", prompts.samples_per_prompt, 1)
    if prompts.limit is not None:
        _at_least("prompts.limit", prompts.limit, 1)


def validate_logger(logger) -> None:
    _allowed("logger.backend", logger.backend, ("wandb", "none"))
    _allowed("logger.mode", logger.mode, ("offline", "online", "disabled"))


def _check_device(path: str, device: str) -> None:
    if not (device in ("auto", "cpu") or str(device).startswith("cuda")):
        raise ConfigError(f"{path}={device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")


def validate_eval(evaluation) -> None:
    # Imported here: stas.evaluation imports this module.
    from stas.evaluation.scores import DIMENSIONS, NEED_STANDARD_PROMPTS

    for name in evaluation.evaluators:
        _allowed("eval.evaluators", name, EVALUATORS)
    if len(set(evaluation.evaluators)) != len(evaluation.evaluators):
        raise ConfigError(f"eval.evaluators={list(evaluation.evaluators)} names an evaluator twice")
    _check_device("eval.device", evaluation.device)
    for name in ("dino", "clip"):
        checkpoint = evaluation[name].checkpoint
        if name in evaluation.evaluators and checkpoint and not Path(checkpoint).expanduser().is_file():
            raise ConfigError(f"eval.{name}.checkpoint={checkpoint!r}: no such file")
    if "vbench" not in evaluation.evaluators:
        return
    vbench = evaluation.vbench
    _allowed("eval.vbench.mode", vbench.mode, VBENCH_MODES)
    if not vbench.dimensions:
        raise ConfigError(f"eval.vbench.dimensions is empty; name at least one of: {', '.join(DIMENSIONS)}")
    for dimension in vbench.dimensions:
        if dimension not in DIMENSIONS:
            raise ConfigError(f"eval.vbench.dimensions contains {dimension!r}, which is not a VBench dimension; "
                              f"allowed: {', '.join(DIMENSIONS)}")
        if vbench.mode == "custom_input" and dimension in NEED_STANDARD_PROMPTS:
            raise ConfigError(f"eval.vbench.dimensions contains {dimension!r}, which VBench scores only on its own "
                              "prompts: use eval.vbench.mode=vbench_standard (with prompts=vbench)")
    if vbench.python and not shutil.which(vbench.python):
        raise ConfigError(f"eval.vbench.python={vbench.python!r}: no such executable")
    if vbench.full_info and not Path(vbench.full_info).is_file():
        raise ConfigError(f"eval.vbench.full_info={vbench.full_info!r}: no such file")
    if vbench.timeout is not None:
        _at_least("eval.vbench.timeout", vbench.timeout, 1)


def shard_of(shard) -> tuple[int, int]:
    """(index, count) of this process's shard: shard.index and shard.count (unset: 0 and 1), never the environment."""
    index = 0 if shard.index is None else shard.index
    count = 1 if shard.count is None else shard.count
    if count < 1:
        raise ConfigError(f"shard.count={count!r} must be >= 1")
    if not 0 <= index < count:
        raise ConfigError(f"shard.index={index!r} must lie in [0, shard.count={count})")
    return index, count


def _no_unknown_keys(node, schema, path: str = "") -> None:
    # Hydra lets `+key=value` add keys even to a structured node; a typo must not pass silently.
    known = {f.name for f in fields(schema)}
    for key in node.keys():
        if not path and key == "hydra":  # compose_config(with_hydra=True) keeps Hydra's own node
            continue
        where = f"{path}.{key}" if path else key
        if key not in known:
            raise ConfigError(_not_a_field(where, known))
        value = OmegaConf.get_type(node, key)
        if is_dataclass(value) and isinstance(node[key], DictConfig):
            _no_unknown_keys(node[key], value, where)


def _not_a_field(path: str, known) -> str:
    parent = path.rpartition(".")[0]
    return f"{path} is not a field of {parent or 'the config'}; fields: {', '.join(sorted(known))}"


def validate(cfg) -> Backbone:
    """Check every value of a composed config; returns the model's backbone."""
    settings = OmegaConf.masked_copy(cfg, list(StasConfig.__dataclass_fields__))
    missing = sorted(OmegaConf.missing_keys(settings))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (e.g. {missing[0]}=...)")
    _no_unknown_keys(cfg, StasConfig)
    _check_numbers(settings, unused=() if cfg.steer.enabled else ("steer",))
    if cfg.seed + cfg.prompts.samples_per_prompt - 1 > SEED_MAX:
        raise ConfigError(f"seed={cfg.seed} is too large for prompts.samples_per_prompt="
                          f"{cfg.prompts.samples_per_prompt}: sample i uses seed + i, which must stay <= {SEED_MAX}")
    backbone = validate_model(cfg.model)
    validate_steer(cfg.steer, cfg.model, backbone)
    validate_prompts(cfg.prompts)
    validate_logger(cfg.logger)
    validate_eval(cfg.eval)
    validate_analysis(cfg.analysis, cfg.model)
    shard_of(cfg.shard)
    return backbone


# ---------------------------------------------------------------------------------------- command-line overrides

TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def config_groups() -> set[str]:
    """The config groups of conf/ ('steer/window' for nested ones) and `experiment`: an override of one chooses an
    option, which Hydra checks (it also knows the options of added search paths)."""
    folders = (path.relative_to(CONF_DIR).as_posix() for path in CONF_DIR.rglob("*") if path.is_dir())
    return {"experiment", *folders}


def check_override(key: str, values: list | None, groups: set[str]) -> None:
    """Refuse, naming the field, an override of a key the schema does not have or a value its field cannot hold.

    Hydra would answer a typo with "Could not override ... To append to your config use +key" (and accept `+key`
    silently), and a wrong type with a multi-line merge error. `values` are the override's parsed values (every value
    of a sweep; None when they are not known before composing, e.g. interval sweeps).
    """
    if key in groups or "/" in key:
        return
    schema, parts = StasConfig, key.split(".")
    for depth, name in enumerate(parts):
        known = {f.name for f in fields(schema)}
        if name not in known:
            raise ConfigError(_not_a_field(".".join(parts[: depth + 1]), known))
        kind = _field_kind(schema, name)
        if depth < len(parts) - 1:
            if not is_dataclass(kind):
                return  # a key inside a list or Any field: its value is checked after composing
            schema = kind
    if kind not in TYPE_NAMES:
        return
    for value in values or []:
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved, then checked, after composing
        try:
            OmegaConf.structured(schema)[name] = value
        except ValidationError:
            bounds = NUMERIC_BOUNDS.get(key)
            raise ConfigError(f"{key}={value!r} must be {TYPE_NAMES[kind]}{f' in {bounds}' if bounds else ''}") from None


def _field_kind(schema, name: str):
    """The type of a schema field, without Optional."""
    hint = typing.get_type_hints(schema)[name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint
