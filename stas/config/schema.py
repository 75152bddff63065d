"""The config schemas: one dataclass per config group, merged under Hydra's composition (`register_configs`)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from stas.config.describe import keys_help
from stas.core.massive import Detection
from stas.errors import ConfigError
from stas.evaluation.schema import EvalConfig
from stas.paths import CONF_DIR, EXPERIMENTS_DIR, REPO_DIR

BRANCHES = ("cond", "uncond", "both")
DETECT_BRANCHES = ("per_branch", "shared")
REFERENCES = ("ma_max", "steered")
DIMS_MODES = ("auto", "all", "calibrated", "calibrated_weak", "calibrated_non_ma")
OFFLOAD_MODES = ("none", "model", "sequential")
SEARCH_DIRECTIONS = ("maximize", "minimize")


@dataclass
class PlantConfig:
    enabled: bool = True  # plant massive activations in the tiny twin (random weights have none)
    channels: List[int] = field(default_factory=lambda: [5, 17, 26])  # the planted MA channels
    # Multiples of the mean |value| of the block output's other channels (stas.backbones.tiny), signed.
    magnitudes: List[float] = field(default_factory=lambda: [100.0, -80.0, 60.0])
    first_frame: float = 1.0  # profile on first-latent-frame tokens (x magnitude)
    boundary: float = 0.5  # profile on boundary tokens of the later latent frames
    interior: float = 0.1  # profile on the other tokens
    boundary_width: int = 1  # boundary = the first and last `width` tokens or token rows of each later latent frame
    boundary_unit: str = "rows"  # rows | tokens
    layers: Optional[List[int]] = None  # blocks to plant in; null: every block


@dataclass
class TinyConfig:
    seed: int = 0  # seed of the tiny twin's random weights
    num_layers: int = 2  # transformer blocks (HunyuanVideo: its double-stream blocks)
    num_single_layers: int = 0  # HunyuanVideo's single-stream blocks, after the double-stream ones; in [0, 4096]
    num_heads: int = 2  # attention heads
    head_dim: int = 64  # hidden_dim = num_heads x head_dim = 128: room for 3 planted MA channels to stand out
    ffn_dim: int = 64  # feed-forward width of a block
    text_dim: int = 32  # width of the small T5 text encoder
    vae_base_dim: int = 3  # base channels of the tiny VAE
    plant: PlantConfig = field(default_factory=PlantConfig)
    # A two-expert twin's second transformer (model.boundary_ratio set): its own planted MAs; null: those of `plant`
    plant_2: Optional[PlantConfig] = None


@dataclass
class ParallelConfig:
    """Context parallelism (README "Running in parallel"): one video's tokens split across ring_degree x
    ulysses_degree ranks started by torchrun (the Wan family; stas.backbones.parallel)."""

    ulysses_degree: int = 1  # ranks of Ulysses attention (must divide the attention heads); 1: none
    ring_degree: int = 1  # ranks of ring attention (CUDA only, bf16/fp16 by default); 1: none
    attention_backend: Optional[str] = None  # diffusers' attention backend under CP; null: native (ring: _native_cudnn)


@dataclass
class ModelConfig:
    name: str = MISSING  # the model option (conf/model/<name>.yaml): W&B tag, run folder, tables' Model column
    # the backbone family (stas/backbones/families): wan21 | wan22 | cogvideox | cogvideox15 | hunyuanvideo | ltx
    family: str = MISSING
    hub_id: Optional[str] = None  # None: a tiny twin built offline from `tiny`
    revision: Optional[str] = None  # the checkpoint's revision on the hub; null: main
    tiny: Optional[TinyConfig] = None  # the tiny twin's sizes and planted MAs (tiny_* models only)
    num_layers: int = MISSING  # transformer blocks (checked against the loaded model)
    hidden_dim: int = MISSING  # hidden-state channels (checked against the loaded model)
    height: int = MISSING  # video height in pixels
    width: int = MISSING  # video width in pixels
    num_frames: int = MISSING  # video frames (latent frames: (F - 1) // the VAE's time compression (4, LTX 8) + 1)
    steps: int = MISSING  # denoising steps
    # classifier-free guidance scale; <= 1: no CFG (one branch). HunyuanVideo (guidance-distilled): the guidance
    # embedded in its one transformer call, never a second branch (see true_cfg_scale)
    guidance_scale: float = MISSING
    # HunyuanVideo's true CFG: > 1 runs a second, uncond branch on model.negative_prompt and guides at this scale;
    # in [0, 100]. Other families' pipelines have none: 1.0 there.
    true_cfg_scale: float = 1.0
    # Two expert transformers (Wan2.2-A14B: WanPipeline's transformer_2 for the low-noise steps): the fraction of the
    # train timesteps below which transformer_2 denoises (t < boundary_ratio x 1000), in [0, 1]; null: one transformer
    # (a checkpoint: its own pipeline config). A tiny twin builds a second transformer when it is set.
    boundary_ratio: Optional[float] = None
    guidance_scale_2: Optional[float] = None  # transformer_2's CFG scale, in [0, 100]; null: guidance_scale
    flow_shift: Optional[float] = None  # the flow-matching scheduler's shift (Wan); null: the scheduler's own
    use_dynamic_cfg: bool = False  # CogVideoX's dynamic CFG schedule
    fps: int = MISSING  # frames per second of the written mp4
    negative_prompt: str = ""  # the CFG negative prompt
    max_sequence_length: int = 226  # text tokens given to the text encoder
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16: the pipeline's weights and compute
    vae_dtype: Optional[str] = None  # the VAE's dtype (Wan); null: float32
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    cpu_offload: str = "none"  # none | model | sequential: diffusers' CPU offloading of the whole pipeline
    vae_tiling: bool = False  # decode the video in spatial tiles (less memory)
    vae_slicing: bool = False  # decode one batch element at a time (less memory)
    compile: str = "none"  # none | regional (the blocks, diffusers' compile_repeated_blocks) | full (forward)
    group_offload: str = "none"  # none | block_level | leaf_level (diffusers' group offloading of the transformer)
    group_offload_blocks: int = 1  # transformer blocks per group with group_offload=block_level
    group_offload_stream: bool = False  # prefetch the next group on a side CUDA stream (diffusers' use_stream)
    layerwise_casting: str = "none"  # none | float8_e4m3fn | float8_e5m2: the transformer's weights' storage dtype
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # context parallelism under torchrun


@dataclass
class WindowConfig:
    start: float = 0.0  # first step steered (a fraction of the steps, or a step index with unit=steps)
    end: float = 0.4  # the window ends before this step
    unit: str = "fraction"  # fraction of the number of steps, or step indices; the window is [start, end)


@dataclass
class SteerConfig:
    name: str = "stas"  # the preset's name: run folder, W&B tag, the tables' Method column
    enabled: bool = True  # false: plain CFG, nothing steered (steer=none)
    rule: str = "max_scaled"  # the target: max_scaled (alpha x M x sign) | per_channel_max | scale | zero
    alpha: float = 1.0  # how hard to steer: the target's multiple, in (0, 100] (max_scaled, per_channel_max, scale)
    strength: float = 1.0  # h <- h + strength x (target - h), in (0, 1]: 1 replaces the value by the target
    targets: str = "first_frame+boundary"  # tokens steered: first_frame | boundary | interior | all, joined by +
    boundary_width: int = 1  # boundary = the first and last `width` tokens or token rows of each later latent frame
    boundary_unit: str = "rows"  # rows | tokens
    dims: Any = "auto"  # auto | all | calibrated | calibrated_weak | calibrated_non_ma | [channel, ...]
    # max_scaled's M: the layer's largest true-MA peak (the paper's global maximum reference magnitude), or the
    # steered channels' own largest peak. The same for dims=auto; they differ for fixed channels (ablation_dims).
    reference: str = "ma_max"
    calibration: Optional[str] = None  # ma_dims.yaml written by stas.analyze
    layers: Any = "all"  # all | [index, ...] | "start:end"
    window: WindowConfig = field(default_factory=WindowConfig)
    branches: str = "both"  # CFG branches steered: cond | uncond | both
    # torch.compile the steering hook alone (its small kernels fused) when the transformer runs eager: on a GPU its
    # kernel launches are most of its cost (README "Performance"); under model.compile the hook is traced anyway
    compile_hook: bool = False


@dataclass
class DetectConfig:
    """Which channels are massive, for steering (steer.dims=auto) and analysis alike: stas.core.massive.Detection
    (whose defaults these are), plus how CFG branches share the channels steering detects."""

    rule: str = Detection.rule  # mean_abs | channel_peak | sun (conf/detect/<rule>.yaml: each with its ratio, floor)
    ratio: float = Detection.ratio  # massive: channel peak > max(ratio x the rule's scale, floor)
    floor: float = Detection.floor  # the least peak that counts as massive, whatever the scale
    max_dims: int = Detection.max_dims  # at most this many channels per hidden state (the largest peaks)
    branches: str = "per_branch"  # per_branch: each CFG branch its own channels; shared: the cond branch's for both


@dataclass
class GuidanceConfig:
    """How the branch predictions of a step are combined in stas's own loop (stas.loop): a diffusers guider
    (stas.loop.guidance.GUIDANCE). The scale is the model's (model.guidance_scale, model.use_dynamic_cfg)."""

    # cfg (classifier-free guidance: `pipe(...)`'s frames bit for bit) | cfg_zero_star | apg | slg | pag |
    # enhance_a_video (README "Guidance": what each costs and where it comes from)
    name: str = "cfg"
    params: Dict[str, Any] = field(default_factory=dict)  # the guider's own keyword arguments (diffusers' names)
    # true: as many steps as keep the transformer passes (NFE) within plain CFG's at model.steps (fewer steps for a
    # guidance that pays an extra pass); false: model.steps steps
    match_nfe: bool = False


@dataclass
class PromptsConfig:
    source: str = "demo"  # demo | list | file | vbench
    prompts: List[str] = field(default_factory=list)  # the prompts of source=list (prompts=list)
    # source=file: a UTF-8 text file, one prompt a line (prompt<TAB>image path: image-to-video), or a .json list of
    # {"prompt", "image"} objects (images relative to the file); vbench: another full_info JSON
    path: Optional[str] = None
    samples_per_prompt: int = 1  # videos per prompt; sample i uses seed + i
    limit: Optional[int] = None  # only the first `limit` prompts
    vbench_dimensions: Optional[List[str]] = None  # source=vbench: only the prompts of these VBench dimensions
    # source=vbench: at least N prompts of each dimension (of vbench_dimensions, else all), the first in the file's
    # order, instead of all; per_dimension=1 gives VBench's 16 dimensions one video each from 11 prompts
    per_dimension: Optional[int] = None


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "stas"  # the W&B project
    entity: Optional[str] = None  # the W&B user or team; null: your default
    group: Optional[str] = None  # the W&B group; null: the experiment name, else model/steer
    tags: List[str] = field(default_factory=list)  # extra W&B tags (model and steer preset are always added)
    log_videos: int = 4  # sample videos uploaded per run
    init_timeout: int = 120  # seconds W&B may take to start


@dataclass
class ShardConfig:
    # Only what is given here shards a run (None: 0 of 1): under a Slurm launcher $SLURM_ARRAY_TASK_ID numbers the
    # sweep's cells, not shards, so it is never read (the sbatch scripts pass shard.index/count explicitly).
    index: Optional[int] = None  # this process makes every count-th video, from the index-th (0-based)
    count: Optional[int] = None  # how many shards the run is split into


ANALYSIS_PLOTS = ("tokens", "ratios", "channels", "profile")


@dataclass
class AnalysisConfig:
    """What stas.analyze captures, detects, calibrates and plots (see docs/analysis.md)."""

    layers: Any = "all"  # blocks captured: all | [index, ...] | "start:end"
    steps: Any = "all"  # denoising steps captured: all | [index, ...] | "start:end"
    # (block, step) pairs whose per-token MA magnitude is kept (S floats each): the sequence plot, within-frame
    # profile and period. None: the middle captured block; the first captured step and the one nearest 10% of steps.
    profile_layers: Any = None  # [index, ...] | null
    profile_steps: Any = None  # [index, ...] | null: the steps of those pairs (see analysis.profile_layers)
    min_frequency: float = 0.5  # calibration: massive in at least this fraction of a block's observations
    weak: int = 4  # calibration: the next-ranked channels that do not qualify, per block
    non_ma: int = 4  # calibration: ordinary channels nearest the median peak, per block
    # The hierarchy verdict and the period test (docs/analysis.md, "The hierarchy verdict"): a region ratio must
    # exceed 1 + min_effect at the lower end of its bootstrap interval over prompts to hold.
    min_effect: float = 0.05
    resamples: int = 1000  # bootstrap resamples over prompts; null draws of the period test
    confidence: float = 0.95  # of the bootstrap intervals; the period test's level is 1 - confidence
    min_prompts: int = 3  # fewer prompts with MAs: the verdict is inconclusive
    plots: List[str] = field(default_factory=lambda: list(ANALYSIS_PLOTS))  # tokens | ratios | channels | profile
    compare: List[str] = field(default_factory=list)  # analysis run directories to put side by side (no sampling)


@dataclass
class SearchConfig:
    """A hyperparameter search (hydra/sweeper=search, Optuna): what each run returns to the sweeper."""

    # The objective: a metric of the run's metrics.json, `evaluator/metric` (e.g. pixel/consistency, its pooled
    # value where it has one, else its mean over videos) or vbench/quality_score | semantic_score | total_score;
    # its evaluator must be in eval.evaluators. null: the run returns nothing (no search).
    metric: Optional[str] = None
    direction: str = "maximize"  # maximize | minimize: the sweeper's direction (hydra/sweeper=search reads it)


@dataclass
class PathsConfig:
    # Where outputs go: runs under <root>/runs/, sweeps under <root>/multirun/ (relative to the working directory)
    root: str = "."


@dataclass
class StasConfig:
    model: ModelConfig = MISSING
    steer: SteerConfig = MISSING
    detect: DetectConfig = MISSING
    guidance: GuidanceConfig = MISSING
    prompts: PromptsConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    shard: ShardConfig = field(default_factory=ShardConfig)
    experiment: Optional[str] = None  # a whole experiment (experiments/<name>.yaml): python -m stas.run -m experiment=x
    # Experiment name: the output folder (runs/<name>/<time>) and W&B group; null: named by what runs,
    # runs/<model>/<steer>/<time> (a sweep: multirun/<time>/<its overrides>)
    name: Optional[str] = None
    seed: int = 0  # sample i of every prompt uses seed + i (a CPU generator: the same frames on any device)
    progress: bool = True  # progress bars on stderr
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


SCHEMAS = {
    "model": ModelConfig,
    "steer": SteerConfig,
    "detect": DetectConfig,
    "guidance": GuidanceConfig,
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


def run_name(name, model, steer, guidance="cfg") -> str:
    """`${run_name:${name},${model.name},${steer.name},${guidance.name}}`: the user's name, or else what runs as
    folders: tiny_wan21/stas, and tiny_wan21/stas+apg with a guidance other than plain CFG."""
    if name is not None and str(name) != "":
        return str(name)
    method = str(steer) if str(guidance) == "cfg" else f"{steer}+{guidance}"
    return f"{path_safe(model)}/{path_safe(method)}"


def named_folder(name) -> str:
    """`${named_folder:${name}}`: `<name>/` when a name is given, else nothing (multirun/<time> of an unnamed sweep)."""
    return "" if name is None or str(name) == "" else f"{name}/"


def repo_path(relative: str) -> str:
    """`${repo:experiments/x.yaml}`: a file shipped with stas, wherever the command runs from."""
    return str(REPO_DIR / relative)


def middle_block(num_layers) -> int:
    """`${middle_block:${model.num_layers}}`: the middle transformer block, where skip-layer and perturbed-attention
    guidance perturb by default on every backbone."""
    return int(num_layers) // 2


@functools.cache
def register_configs() -> None:
    """Register the root schema (conf/config.yaml lists it first, so every group is merged onto its dataclass).
    Once per process: ConfigStore keeps what is stored, and loading every experiment again costs a quarter second
    per composed config."""
    for name, resolver in (("path_safe", path_safe), ("repo", repo_path), ("run_name", run_name),
                           ("named_folder", named_folder), ("stas_keys", keys_help), ("middle_block", middle_block)):
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


