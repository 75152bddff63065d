"""Checks of a composed config at start-up, before any model loads: ranges, finite numbers, cross-field rules.

Each failure raises `ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stas.backbones import (COMPILE_MODES, DTYPES, FAMILIES, GROUP_OFFLOAD_MODES, LAYERWISE_CASTING_DTYPES, Backbone,
                            backbone_from_config)
from stas.backbones.parallel import check_parallel
from stas.config.model_checks import check_experts, check_matched_steps, check_steps, check_tiny, check_true_cfg
from stas.config.schema import (ANALYSIS_PLOTS, BRANCHES, DETECT_BRANCHES, DIMS_MODES, OFFLOAD_MODES, REFERENCES,
                               SEARCH_DIRECTIONS, StasConfig)
from stas.core.layout import BOUNDARY_UNITS, LayoutError, TokenLayout, parse_targets
from stas.core.massive import CALIBRATION_KINDS, DETECTION_RULES, RULE_PRESETS, Detection
from stas.core.rules import RULES_WITH_ALPHA, check_rule
from stas.core.selection import (WINDOW_UNITS, AnalysisSelection, analysis_selection, shard_of, steered_layers,
                                 window_steps)
from stas.errors import ConfigError, check_allowed, check_at_least
from stas.evaluation.schema import EVAL_BOUNDS, validate_eval
from stas.loop import GUIDANCE, make_guider
from stas.loop.guidance import skipped_layers
from stas.methods.stas import calibration_by_expert, steering_calibration

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
    "model.guidance_scale_2": Bounds(0, 100),
    "model.true_cfg_scale": Bounds(0, 100),
    "model.boundary_ratio": Bounds(0, 1),  # of the train timesteps: 0, only transformer; 1, only transformer_2
    "model.flow_shift": Bounds(0.01, 100),  # far below the published 1-12 the schedule collapses (black video)
    "model.fps": Bounds(1, 240),
    "model.max_sequence_length": Bounds(1, 4096),
    "model.group_offload_blocks": Bounds(1, 4096),
    "model.tiny.seed": Bounds(0, SEED_MAX),
    "steer.strength": Bounds(0, 1, low_open=True),  # 0 would leave every value as it is
    "detect.ratio": Bounds(0, 1_000_000, low_open=True),
    "detect.floor": Bounds(0, 1_000_000_000),
    "model.tiny.num_single_layers": Bounds(0, 4096),  # 0: a family with one block list
    **{f"model.tiny.{size}": Bounds(1, 4096) for size in ("num_layers", "num_heads", "head_dim", "ffn_dim", "text_dim",
                                                         "vae_base_dim")},
    **{f"model.tiny.{plant}.{region}": Bounds(0, 100) for plant in ("plant", "plant_2")
       for region in ("first_frame", "boundary", "interior")},
    **{path: Bounds(low, high) for path, (low, high) in EVAL_BOUNDS.items()},  # each evaluator's (stas.evaluation)
    "logger.log_videos": Bounds(0, 100000),
    "guidance.params.guidance_rescale": Bounds(0, 1),  # the guiders' rescale towards the cond prediction
    "guidance.params.zero_init_steps": Bounds(0, 10000),
    **{f"guidance.params.{key}": Bounds(0, 100) for key in ("skip_layer_guidance_scale", "perturbed_guidance_scale")},
    **{f"guidance.params.{kind}_{end}": Bounds(0, 1) for kind in ("skip_layer_guidance", "perturbed_guidance", "enhance")
       for end in ("start", "stop")},
    "guidance.params.enhance_weight": Bounds(-100, 100),  # below -frames the factor is 1: no enhancement
}
ALPHA_BOUNDS = Bounds(0, 100, low_open=True)  # for the rules that use alpha
# the hierarchy verdict: below 100 resamples the interval's tails are a handful of draws; one prompt gives no interval
VERDICT_BOUNDS = {"min_effect": Bounds(0, 10), "resamples": Bounds(100, 1000000), "min_prompts": Bounds(2, 100000)}


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


def validate_model(model) -> Backbone:
    check_allowed("model.family", model.family, FAMILIES)
    if model.hub_id is None and model.tiny is None:
        raise ConfigError(f"model {model.name!r} needs model.hub_id (a real checkpoint) or model.tiny (a tiny twin)")
    check_allowed("model.dtype", model.dtype, DTYPES)
    if model.vae_dtype is not None:
        check_allowed("model.vae_dtype", model.vae_dtype, DTYPES)
    check_allowed("model.cpu_offload", model.cpu_offload, OFFLOAD_MODES)
    check_allowed("model.compile", model.compile, COMPILE_MODES)
    if model.compile != "none" and model.cpu_offload == "sequential":
        raise ConfigError(f"model.compile={model.compile} cannot be combined with model.cpu_offload=sequential (its "
                          "hooks move every layer's weights inside the compiled code); use model.cpu_offload=model "
                          "or model.compile=none")
    _check_memory_options(model)
    _check_device("model.device", model.device)
    check_at_least("model.num_layers", model.num_layers, 1)
    backbone = backbone_from_config(model)
    problems = backbone.video_problems(model.height, model.width, model.num_frames)
    if problems:
        raise ConfigError("model." + "; model.".join(problems))
    check_steps(model, backbone)
    check_experts(model, backbone)
    check_true_cfg(model, backbone)
    if model.tiny is not None:
        check_tiny(model, backbone)
    return backbone


def _check_memory_options(model) -> None:
    """model.group_offload and model.layerwise_casting, and the combinations that cannot work."""
    check_allowed("model.group_offload", model.group_offload, GROUP_OFFLOAD_MODES)
    check_allowed("model.layerwise_casting", model.layerwise_casting, LAYERWISE_CASTING_DTYPES)
    if model.group_offload != "none" and model.cpu_offload != "none":
        # diffusers refuses it too: both move the transformer's weights between CPU and device, each its own way
        raise ConfigError(f"model.group_offload={model.group_offload} cannot be combined with model.cpu_offload="
                          f"{model.cpu_offload} (both move the transformer's weights); set one of them to none")
    if model.group_offload_stream and model.group_offload == "none":
        raise ConfigError("model.group_offload_stream=true prefetches the groups of group offloading, but "
                          "model.group_offload=none; set model.group_offload=block_level (or leaf_level)")
    if model.group_offload_stream and str(model.device) == "cpu":
        raise ConfigError("model.group_offload_stream=true needs a CUDA device (a side CUDA stream), but "
                          "model.device=cpu; set model.group_offload_stream=false")
    # Measured on the tiny Wan twin with dynamo's counters: under model.compile=regional, block_level group offloading
    # breaks each compiled block's graph once (diffusers runs its onload/offload outside graphs) and recompiles nothing
    # (tests/backbones/test_offload.py); leaf-level and casting hooks split the graphs at every layer and recompile.
    # model.compile=full with block_level: a graph break at every group, the transformer's graph in dozens of pieces.
    if model.compile == "full" and model.group_offload != "none":
        raise ConfigError(f"model.compile=full cannot be combined with model.group_offload={model.group_offload} (its "
                          "onload/offload between groups split the transformer's graph); use model.compile=regional "
                          "with model.group_offload=block_level, or model.compile=none")
    if model.compile != "none" and model.group_offload == "leaf_level":
        raise ConfigError(f"model.compile={model.compile} cannot be combined with model.group_offload=leaf_level (its "
                          "hooks on every layer split the compiled graphs and recompile); use "
                          "model.group_offload=block_level or model.compile=none")
    if model.compile != "none" and model.layerwise_casting != "none":
        raise ConfigError(f"model.compile={model.compile} cannot be combined with model.layerwise_casting="
                          f"{model.layerwise_casting} (its casting hooks on every layer split the compiled graphs and "
                          "recompile); use model.compile=none")
    if model.layerwise_casting != "none" and model.cpu_offload == "sequential":
        raise ConfigError(f"model.layerwise_casting={model.layerwise_casting} cannot be combined with "
                          "model.cpu_offload=sequential (accelerate's hooks and diffusers' casting hooks both replace "
                          "each layer's weights); use model.group_offload=leaf_level for the same memory")


def validate_steer(steer, model, backbone: Backbone) -> None:
    if not steer.enabled:
        return
    check_steer_options(steer, model, backbone)
    if steer.branches == "uncond" and not backbone.uses_cfg(backbone.pipeline_kwargs(model)):
        raise ConfigError(f"steer.branches=uncond, but model {model.name} runs no classifier-free guidance at these "
                          f"settings ({backbone.cfg_settings(model)}), so there is no uncond branch: STAS would steer "
                          "nothing")
    layout = TokenLayout(*backbone.latent_grid(model.height, model.width, model.num_frames))
    try:
        layout.boundary_span(steer.boundary_width, steer.boundary_unit)
    except LayoutError as err:
        raise ConfigError(f"steer.boundary_width={steer.boundary_width!r}: {err}") from None
    if not layout.mask(steer.targets, steer.boundary_width, steer.boundary_unit).any():
        raise ConfigError(f"steer.targets={steer.targets!r} selects no token of a {layout.frames}-latent-frame video "
                          f"(model.num_frames={model.num_frames}): STAS would steer nothing")
    if not window_steps(steer.window, model.steps):
        window = steer.window
        raise ConfigError(f"steer.window=[{window.start}, {window.end}) ({window.unit}) of model.steps={model.steps} "
                          "contains no step: STAS would steer nothing; widen the window or raise model.steps")


def check_steer_options(steer, model, backbone: Backbone) -> None:
    """The checks of a `steer` config that hold for any video and step count (stas.apply_stas runs these alone);
    `model` has name, num_layers and hidden_dim (a model config or a Backbone)."""
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
    check_allowed("steer.boundary_unit", steer.boundary_unit, BOUNDARY_UNITS)
    check_allowed("steer.branches", steer.branches, BRANCHES)
    check_allowed("steer.window.unit", steer.window.unit, WINDOW_UNITS)
    layers = steered_layers(steer.layers, model.num_layers)
    check_allowed("steer.reference", steer.reference, REFERENCES)
    dims = steer.dims
    if isinstance(dims, str):
        check_allowed("steer.dims", dims, DIMS_MODES)
        calibration = steering_calibration(steer, model)
        if calibration is not None and not any(channels.get(layer) for channels in
                                               calibration_by_expert(calibration).values() for layer in layers):
            raise ConfigError(f"steer.calibration={steer.calibration!r}: lists no {CALIBRATION_KINDS[dims]} channel "
                              f"for the steered blocks {layers}: STAS would steer nothing")
    else:
        channels = list(dims)
        if not channels or not all(isinstance(c, int) and 0 <= c < model.hidden_dim for c in channels):
            raise ConfigError(
                f"steer.dims={channels!r}: a channel list must be non-empty integers in 0..{model.hidden_dim - 1}"
            )


def _validate_verdict(analysis) -> None:
    """The hierarchy verdict's and period test's settings (stas.ma.hierarchy.VerdictSettings)."""
    for name, bounds in VERDICT_BOUNDS.items():
        _in_bounds(f"analysis.{name}", getattr(analysis, name), bounds)
    if not 0.5 <= analysis.confidence < 1:
        raise ConfigError(f"analysis.confidence={analysis.confidence!r} must lie in [0.5, 1)")


def validate_analysis(analysis, model) -> AnalysisSelection:
    selection = analysis_selection(analysis, model.num_layers, model.steps)
    if not 0 < analysis.min_frequency <= 1:
        raise ConfigError(f"analysis.min_frequency={analysis.min_frequency!r} must lie in (0, 1]")
    check_at_least("analysis.weak", analysis.weak, 0)
    check_at_least("analysis.non_ma", analysis.non_ma, 0)
    _validate_verdict(analysis)
    for plot in analysis.plots:
        check_allowed("analysis.plots entry", plot, ANALYSIS_PLOTS)
    return selection


def validate_detect(detect, steer) -> Detection:
    check_allowed("detect.rule", detect.rule, DETECTION_RULES)
    check_at_least("detect.max_dims", detect.max_dims, 1)
    check_allowed("detect.branches", detect.branches, DETECT_BRANCHES)
    settings = {"ratio": detect.ratio, "floor": detect.floor}
    borrowed = [rule for rule, preset in RULE_PRESETS.items() if preset == settings and rule != detect.rule]
    if borrowed:  # detect.rule=sun on the default group keeps mean_abs's ratio and floor: almost never meant
        raise ConfigError(f"detect.rule={detect.rule} with {borrowed[0]}'s ratio {detect.ratio:g} and floor "
                          f"{detect.floor:g}: choose a rule with its own settings by detect={detect.rule}, or set "
                          "detect.ratio and detect.floor too")
    if detect.branches == "shared" and steer.enabled and steer.branches == "uncond":
        raise ConfigError("detect.branches=shared steers both branches with the channels detected on the cond "
                          "branch, but steer.branches=uncond never runs the steering hook on it; use "
                          "detect.branches=per_branch")
    try:
        return Detection.of(detect)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate_guidance(guidance, model, backbone: Backbone) -> None:
    check_allowed("guidance.name", guidance.name, GUIDANCE)
    guider = make_guider(guidance)  # its parameters: names the guider takes, values it accepts
    outside = [index for index in skipped_layers(guider) if not 0 <= index < model.num_layers]
    if outside:
        raise ConfigError(f"guidance={guidance.name} perturbs blocks {outside}, but {model.name} has blocks 0 to "
                          f"{model.num_layers - 1} (model.num_layers={model.num_layers}); set the guider's layers "
                          "in guidance.params")
    if guidance.match_nfe:
        check_matched_steps(guidance.name, guider, model, backbone)
    params = guidance.params
    if "enhance_start" in params and not params.enhance_start < params.get("enhance_stop", 1.0):
        raise ConfigError(f"guidance.params.enhance_start={params.enhance_start} must be below "
                          f"guidance.params.enhance_stop={params.get('enhance_stop', 1.0)}: the steps it enhances")


def validate_prompts(prompts) -> None:
    check_allowed("prompts.source", prompts.source, ("demo", "list", "file", "vbench"))
    if prompts.source == "file" and not prompts.path:
        raise ConfigError("prompts=file needs prompts.path=<text file, one prompt a line>")
    for name in ("samples_per_prompt", "limit", "per_dimension"):  # the schema lets only the last two be null
        if prompts[name] is not None:
            check_at_least(f"prompts.{name}", prompts[name], 1)
    if prompts.per_dimension is not None and prompts.source != "vbench":
        raise ConfigError(f"prompts.per_dimension={prompts.per_dimension} selects VBench prompts by dimension: it "
                          f"needs prompts=vbench, not prompts.source={prompts.source}")


def validate_logger(logger) -> None:
    check_allowed("logger.backend", logger.backend, ("wandb", "none"))
    check_allowed("logger.mode", logger.mode, ("offline", "online", "disabled"))


def validate_paths(paths) -> None:
    """paths.root: a directory (or none yet) that Hydra puts runs/ and multirun/ under; checked before Hydra makes
    any folder there (stas.cli.OutputDirCheck) and by `validate`."""
    root = paths.root
    if not isinstance(root, str) or not root.strip():
        raise ConfigError(f"paths.root={root!r} must name a directory, e.g. paths.root=/scratch/$USER/stas "
                          "(default '.': runs/ and multirun/ in the working directory)")
    if root.startswith("~"):
        raise ConfigError(f"paths.root={root!r}: '~' is not expanded here; give the path, e.g. paths.root=$HOME/...")
    if Path(root).exists() and not Path(root).is_dir():
        raise ConfigError(f"paths.root={root!r} is a file, not a directory")


def validate_search(search, evaluation, shard) -> None:
    """search.metric names a metric the run's own evaluation writes into its metrics.json (stas.run returns it)."""
    check_allowed("search.direction", search.direction, SEARCH_DIRECTIONS)
    if search.metric is None:
        return
    evaluator, _, metric = str(search.metric).partition("/")
    if not (evaluator and metric):
        raise ConfigError(f"search.metric={search.metric!r} must be evaluator/metric as metrics.json names it, e.g. "
                          "pixel/consistency or vbench/quality_score")
    if evaluator not in evaluation.evaluators:
        raise ConfigError(f"search.metric={search.metric!r} needs {evaluator!r} in eval.evaluators (now "
                          f"{list(evaluation.evaluators)}): the objective is read from the run's metrics.json")
    if shard_of(shard)[1] > 1:
        raise ConfigError(f"search.metric={search.metric!r} cannot be read from a sharded run (shard.count="
                          f"{shard.count}): each shard scores only its videos and writes no metrics.json")


def _check_device(path: str, device: str) -> None:
    if not (device in ("auto", "cpu") or str(device).startswith("cuda")):
        raise ConfigError(f"{path}={device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")


def _no_unknown_keys(node, schema, path: str = "") -> None:
    # Hydra lets `+key=value` add keys even to a structured node; a typo must not pass silently.
    known = {f.name for f in fields(schema)}
    for key in node.keys():
        if not path and key == "hydra":  # compose_config(with_hydra=True) keeps Hydra's own node
            continue
        where = f"{path}.{key}" if path else key
        if key not in known:
            raise ConfigError(not_a_field(where, known))
        value = OmegaConf.get_type(node, key)
        if is_dataclass(value) and isinstance(node[key], DictConfig):
            _no_unknown_keys(node[key], value, where)


# Fields that moved: an old command line gets told where they went.
MOVED_FIELDS = {"steer.ratio": "detect.ratio", "steer.max_dims": "detect.max_dims", "analysis.ratio": "detect.ratio",
                "analysis.max_dims": "detect.max_dims"}


def not_a_field(path: str, known) -> str:
    if path in MOVED_FIELDS:
        return (f"{path} moved to {MOVED_FIELDS[path]}: one MA detection (the `detect` group: rule, ratio, floor, "
                "max_dims, branches) now serves steering and analysis alike")
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
    validate_detect(cfg.detect, cfg.steer)
    validate_guidance(cfg.guidance, cfg.model, backbone)
    check_parallel(cfg.model, backbone, cfg.detect.rule, cfg.guidance.name, GUIDANCE[cfg.guidance.name].change)
    validate_prompts(cfg.prompts)
    validate_logger(cfg.logger)
    validate_paths(cfg.paths)
    validate_eval(cfg.eval)
    validate_search(cfg.search, cfg.eval, cfg.shard)
    validate_analysis(cfg.analysis, cfg.model)
    shard_of(cfg.shard)
    return backbone


