"""The config schemas: one dataclass per config group, merged under Hydra's composition (`register_configs`)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from stas.core.massive import Detection
from stas.errors import ConfigError
from stas.evaluation.schema import EvalConfig
from stas.paths import CONF_DIR, EXPERIMENTS_DIR, REPO_DIR

BRANCHES = ("cond", "uncond", "both")
DETECT_BRANCHES = ("per_branch", "shared")
REFERENCES = ("ma_max", "steered")
DIMS_MODES = ("auto", "all", "calibrated", "calibrated_weak", "calibrated_non_ma")
OFFLOAD_MODES = ("none", "model", "sequential")


@dataclass
class PlantConfig:
    enabled: bool = True
    channels: List[int] = field(default_factory=lambda: [5, 17, 26])
    # Multiples of the mean |value| of the block output's other channels (stas.backbones.tiny), signed.
    magnitudes: List[float] = field(default_factory=lambda: [100.0, -80.0, 60.0])
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
    head_dim: int = 64  # hidden_dim = num_heads x head_dim = 128: room for 3 planted MA channels to stand out
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
    group_offload: str = "none"  # none | block_level | leaf_level (diffusers' group offloading of the transformer)
    group_offload_blocks: int = 1  # transformer blocks per group with group_offload=block_level
    layerwise_casting: str = "none"  # none | float8_e4m3fn | float8_e5m2: the transformer's weights' storage dtype


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
    # max_scaled's M: the layer's largest true-MA peak (the paper's global maximum reference magnitude), or the
    # steered channels' own largest peak. The same for dims=auto; they differ for fixed channels (ablation_dims).
    reference: str = "ma_max"
    calibration: Optional[str] = None  # ma_dims.yaml written by stas.analyze
    layers: Any = "all"  # all | [index, ...] | "start:end"
    window: WindowConfig = field(default_factory=WindowConfig)
    branches: str = "both"


@dataclass
class DetectConfig:
    """Which channels are massive, for steering (steer.dims=auto) and analysis alike: stas.core.massive.Detection
    (whose defaults these are), plus how CFG branches share the channels steering detects."""

    rule: str = Detection.rule  # mean_abs | channel_peak | sun (conf/detect/<rule>.yaml: each with its ratio, floor)
    ratio: float = Detection.ratio  # massive: channel peak > max(ratio x the rule's scale, floor)
    floor: float = Detection.floor
    max_dims: int = Detection.max_dims  # at most this many channels per hidden state (the largest peaks)
    branches: str = "per_branch"  # per_branch: each CFG branch its own channels; shared: the cond branch's for both


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
    min_frequency: float = 0.5  # calibration: massive in at least this fraction of a block's observations
    weak: int = 4  # calibration: the next-ranked channels that do not qualify, per block
    non_ma: int = 4  # calibration: ordinary channels nearest the median peak, per block
    # The hierarchy verdict and the period test (docs/analysis.md, "The hierarchy verdict"): a region ratio must
    # exceed 1 + min_effect at the lower end of its bootstrap interval over prompts to hold.
    min_effect: float = 0.05
    resamples: int = 1000  # bootstrap resamples over prompts; null draws of the period test
    confidence: float = 0.95  # of the bootstrap intervals; the period test's level is 1 - confidence
    min_prompts: int = 3  # fewer prompts with MAs: the verdict is inconclusive
    plots: List[str] = field(default_factory=lambda: list(ANALYSIS_PLOTS))
    compare: List[str] = field(default_factory=list)  # analysis run directories to put side by side (no sampling)


@dataclass
class PathsConfig:
    # Where outputs go: runs under <root>/runs/, sweeps under <root>/multirun/ (relative to the working directory)
    root: str = "."


@dataclass
class StasConfig:
    model: ModelConfig = MISSING
    steer: SteerConfig = MISSING
    detect: DetectConfig = MISSING
    prompts: PromptsConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    shard: ShardConfig = field(default_factory=ShardConfig)
    experiment: Optional[str] = None
    # Experiment name: the output folder (runs/<name>/<time>) and W&B group; null: named by what runs,
    # runs/<model>/<steer>/<time> (a sweep: multirun/<time>/<its overrides>)
    name: Optional[str] = None
    seed: int = 0
    progress: bool = True
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


SCHEMAS = {
    "model": ModelConfig,
    "steer": SteerConfig,
    "detect": DetectConfig,
    "prompts": PromptsConfig,
    "eval": EvalConfig,
    "logger": LoggerConfig,
    "analysis": AnalysisConfig,
}


MAX_DIR_NAME = 200  # bytes; file systems allow 255 per name


def path_safe(text: str) -> str:
    """A sweep's override_dirname as one directory name: a group override such as steer/window=late has a '/' (made
    '.'), Hydra escapes spaces and ':' (a\\ cat: the backslashes go); a name longer than MAX_DIR_NAME bytes is cut and
    ends with a hash of the whole; nothing at all is `run`."""
    name = str(text).replace("/", ".").replace("\\", "").replace("\0", "")
    if len(name.encode("utf-8")) > MAX_DIR_NAME:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
        name = name.encode("utf-8")[: MAX_DIR_NAME - 13].decode("utf-8", "ignore") + "-" + digest
    return name or "run"


def run_name(name, *parts) -> str:
    """`${run_name:${name},${model.name},${steer.name}}`: the user's name, or else what runs as folders
    (tiny_wan21/stas)."""
    if name is not None and str(name) != "":
        return str(name)
    return "/".join(path_safe(part) for part in parts)


def named_folder(name) -> str:
    """`${named_folder:${name}}`: `<name>/` when a name is given, else nothing (multirun/<time> of an unnamed sweep)."""
    return "" if name is None or str(name) == "" else f"{name}/"


def repo_path(relative: str) -> str:
    """`${repo:experiments/x.yaml}`: a file shipped with stas, wherever the command runs from."""
    return str(REPO_DIR / relative)


@functools.cache
def register_configs() -> None:
    """Register the root schema (conf/config.yaml lists it first, so every group is merged onto its dataclass).
    Once per process: ConfigStore keeps what is stored, and loading every experiment again costs a quarter second
    per composed config."""
    for name, resolver in (("path_safe", path_safe), ("repo", repo_path), ("run_name", run_name),
                           ("named_folder", named_folder)):
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


