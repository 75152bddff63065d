"""Video generation with CFG (and STAS when configured) into a run directory, resumable and shardable.

Videos are sampled by stas's own loop (stas.loop) with the `guidance` config's diffusers guider; with guidance=cfg
its frames are `pipe(...)`'s bit for bit. `run_pipeline(..., loop=None)` calls the pipeline itself."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from stas.backbones import Backbone, available_models, backbone_from_config, get_backbone, load_pipeline
from stas.backbones.parallel import from_leader, is_leader
from stas.core.selection import shard_of
from stas.methods import StasSteerer, steering_calibration
from stas.core.layout import TokenLayout
from stas.errors import ConfigError, UserError
from stas.loop import OwnedLoop, make_changes, make_guider
from stas.prompts import Item, Prompt, load_prompt_set, make_items, shard_items
from stas.rundir import (GENERATION_FIELDS, VIDEOS_DIR, JsonlRecords, atomic_write_json, checked_rows, file_lock,
                         record_files, remove_leftovers, shard_file, video_path, writing)
from stas.rundir import PARTIAL_DIR, remove_empty_dir
from stas.video import count_frames, publish_mp4, to_uint8


def generation_file(run_dir: Path, index: int, count: int) -> Path:
    """Where a shard records its videos; an unsharded run writes generation.jsonl directly."""
    return shard_file(run_dir, "generation", index, count)


def generation_rows(run_dir: Path, keys: set[str] | None = None, whole_only: bool = True) -> dict[str, dict]:
    """Every recorded video of a run directory (of `keys`, if given) whose file is whole (or every row, checked,
    with `whole_only=False`), from generation.jsonl and all shard files."""
    rows = {}
    for path in record_files(run_dir, "generation"):
        for row in checked_rows(path, GENERATION_FIELDS):
            if keys is not None and row["key"] not in keys:
                continue  # generation asks for one video before making it: only its row's path is resolved
            video = video_path(run_dir, row["path"], f"{path}, row with key {row['key']!r}")
            if not whole_only or is_whole(video, row):
                rows[row["key"]] = row
    return rows


COST_FIELDS = ("nfe", "steps", "seconds")  # of a generation row: what a video cost


def video_costs(run_dir: Path) -> dict[str, float]:
    """Mean NFE (transformer passes), steps and seconds per recorded video of a run; NaN for what a run did not record
    (NFE came with stas's own loop). A UserError names a row whose value is not a number (untrusted input)."""
    values = {name: [] for name in COST_FIELDS}
    for row in generation_rows(run_dir, whole_only=False).values():
        for name, value in ((name, row.get(name)) for name in COST_FIELDS if row.get(name) is not None):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise UserError(f"{run_dir}: the generation row of {row['key']!r} has {name}={value!r}; it must be "
                                "a number")
            values[name].append(float(value))
    return {name: float(np.mean(found)) if found else np.nan for name, found in values.items()}


def is_whole(video: Path, row: dict) -> bool:
    """Whether `video` is the file its row records, not a torn one (a full disk, a kill, a broken copy).

    Videos are checked to decode to all their frames before they are recorded, with their size: a file of that
    size is the checked one. Rows written before sizes were recorded: the file must decode to `num_frames`."""
    if not video.is_file():
        return False
    if "bytes" in row:
        return video.stat().st_size == row["bytes"]
    try:
        return count_frames(video) == row.get("num_frames")
    except ValueError:
        return False


def run_items(cfg) -> list[Item]:
    prompts = load_prompt_set(cfg.prompts)
    check_images_taken(prompts, cfg.model)
    return make_items(prompts, cfg.prompts.samples_per_prompt, cfg.seed)


def check_images_taken(prompts: list[Prompt], model_cfg) -> None:
    """A ConfigError naming the first prompt with an image when the model generates from text only."""
    given = next((prompt for prompt in prompts if prompt.image is not None), None)
    if given is None:
        return
    backbone = backbone_from_config(model_cfg)
    if backbone.takes_image:
        return
    takers = [name for name in available_models() if get_backbone(name).takes_image]
    raise ConfigError(f"{given.where} gives an image ({given.image!r}), but model={backbone.name} (family "
                      f"{backbone.family}) generates from text only; models that take an image: {', '.join(takers)}. "
                      "Remove the image from the prompt file, or choose one of those models.")


def make_steerer(cfg, backbone: Backbone) -> StasSteerer | None:
    if not cfg.steer.enabled:
        return None
    return StasSteerer(backbone, cfg.steer, steering_calibration(cfg.steer, cfg.model), cfg.detect)


def make_loop(cfg, backbone: Backbone) -> OwnedLoop:
    """stas's own denoising loop with the guider of `cfg.guidance` (and its changes to the transformer)."""
    return OwnedLoop(backbone, make_guider(cfg.guidance), make_changes(cfg.guidance, backbone))


def sampling_kwargs(cfg, backbone: Backbone, loop: OwnedLoop) -> dict:
    """The pipeline call's arguments of every video of a run: the model's, with fewer steps under
    guidance.match_nfe for a guidance that pays extra transformer passes."""
    kwargs = backbone.pipeline_kwargs(cfg.model)
    if cfg.guidance.match_nfe:
        kwargs["num_inference_steps"] = loop.steps_matching_nfe(kwargs["num_inference_steps"],
                                                                backbone.uses_cfg(kwargs))
    return kwargs


def sample(pipe, item: Item, kwargs: dict, steerer: StasSteerer | None, layout: TokenLayout,
           loop: OwnedLoop | None = None):
    """One video's frames, (T, H, W, 3) uint8; the CPU generator makes it reproducible on any device."""
    return to_uint8(run_pipeline(pipe, item, kwargs, steerer, layout, loop).frames[0])


def run_pipeline(pipe, item: Item, kwargs: dict, steerer: StasSteerer | None, layout: TokenLayout,
                 loop: OwnedLoop | None = None):
    """The output for one item (stas.analyze asks for output_type='latent' and reads its hooks) of `loop` (stas's
    own, see make_loop), or of the pipeline's own `pipe(...)` when None. An item with an image passes it as `image`
    (to `pipe(...)` too, which must then take one: WanImageToVideoPipeline)."""
    if steerer is not None:
        steerer.begin(layout, kwargs["num_inference_steps"],
                      do_cfg=steerer.backbone.uses_cfg(kwargs))
    generator = torch.Generator(device="cpu").manual_seed(item.seed)
    image = {} if item.image_file is None else {"image": load_image(item.image_file)}
    with torch.inference_mode():
        if loop is None:
            return pipe(prompt=item.prompt, generator=generator, **image, **kwargs)
        return loop(pipe, prompt=item.prompt, generator=generator, **image, **kwargs)


def load_image(path: str):
    """The RGB image a prompt starts from, read as diffusers' load_image reads it (EXIF orientation applied)."""
    from diffusers.utils import load_image as diffusers_load_image

    return diffusers_load_image(path)


@dataclass
class GenerationSummary:
    videos_dir: Path
    records: Path
    generated: int
    skipped: int
    elsewhere: int  # claimed by another process of the same run while this one ran
    seconds_per_video: float
    steering: dict | None

    def __str__(self) -> str:
        speed = f", {self.seconds_per_video:.2f} s per video" if self.generated else ""
        elsewhere = f", {self.elsewhere} claimed by another process of this run" if self.elsewhere else ""
        return (f"{self.generated} video(s) generated, {self.skipped} already complete{elsewhere}{speed}\n"
                f"  videos:  {self.videos_dir}\n  records: {self.records}")


def generate(cfg, run_dir: Path, backbone: Backbone, logger) -> GenerationSummary:
    """Generate every missing video of this shard into `run_dir`; complete ones are skipped.

    Each video is claimed first (a lock on its temporary file in .partial/), so processes of the same run in one
    directory (shards, or the same command started twice) never make a video twice. Context-parallel (model.parallel
    under torchrun), this is rank 0's part: it tells the other ranks (`follow`) which video it samples next."""
    index, count = shard_of(cfg.shard)
    items = shard_items(run_items(cfg), index, count)
    videos_dir, partial_dir = run_dir / VIDEOS_DIR, run_dir / PARTIAL_DIR
    with writing(run_dir):
        videos_dir.mkdir(parents=True, exist_ok=True)
        partial_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(partial_dir)
    done = generation_rows(run_dir, {item.key for item in items})  # any shard layout of an earlier run counts
    records = JsonlRecords(generation_file(run_dir, index, count), key=lambda row: row["key"])
    todo = [item for item in items if item.key not in done]
    steering_record = None
    seconds = []
    if from_leader(bool(todo)):
        pipe, steerer, loop, layout, kwargs = sampler(cfg, backbone)
        with steerer.attach(backbone.experts(pipe)) if steerer is not None else nullcontext():
            for item in tqdm(todo, desc=f"videos (shard {index + 1}/{count})", disable=not cfg.progress):
                path, partial = videos_dir / item.filename, partial_dir / item.filename
                with file_lock(partial, wait=False, remove=True) as claim:
                    if claim is None or generation_rows(run_dir, {item.key}):
                        continue  # another process is making it, or made it since we looked
                    from_leader(item.key)
                    start = time.perf_counter()
                    frames = sample(pipe, item, kwargs, steerer, layout, loop)
                    size = publish_mp4(frames, partial, path, cfg.model.fps)
                    seconds.append(time.perf_counter() - start)
                    row = video_row(cfg, item, path.relative_to(run_dir), frames, seconds[-1], size)
                    # the cost to compare methods at: network function evaluations, and the steps they took
                    row["nfe"], row["steps"] = loop.nfe, kwargs["num_inference_steps"]
                    if (guidance_record := loop.record()) is not None:
                        row["guidance_record"] = guidance_record
                    if steerer is not None:
                        row["steering"] = steering_record = steerer.record()
                    records.append(row)
                logger.log({"video/seconds": seconds[-1], "video/prompt_index": item.prompt_index})
                logger.log_video(path, caption=f"{item.prompt} (seed {item.seed})", fps=cfg.model.fps)
        from_leader(None)
    order = {item.key: n for n, item in enumerate(items)}
    records.compact(order=lambda row: order.get(row["key"], len(order)))
    logger.log_table("generation", list(records.rows.values()))
    if steering_record is not None:
        atomic_write_json(run_dir / "steering.json", steering_record)
    remove_empty_dir(partial_dir)  # another process of the run that claims a video later makes it again
    return GenerationSummary(videos_dir, records.path, len(seconds), len(items) - len(todo), len(todo) - len(seconds),
                             sum(seconds) / len(seconds) if seconds else 0.0, steering_record)


def sampler(cfg, backbone: Backbone) -> tuple:
    """(pipe, steerer, loop, layout, pipeline kwargs) of a run's videos."""
    pipe = load_pipeline(cfg.model, backbone)
    steerer, loop = make_steerer(cfg, backbone), make_loop(cfg, backbone)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    pipe.set_progress_bar_config(disable=not cfg.progress or not is_leader(), leave=False, desc="denoising steps")
    return pipe, steerer, loop, layout, sampling_kwargs(cfg, backbone, loop)


def follow(cfg, backbone: Backbone) -> None:
    """A context-parallel rank other than 0 (model.parallel under torchrun): it samples every video rank 0 samples
    (`generate` names each one), taking its part in each transformer call, and writes nothing."""
    if not from_leader(None):
        return
    items = {item.key: item for item in run_items(cfg)}
    pipe, steerer, loop, layout, kwargs = sampler(cfg, backbone)
    with steerer.attach(backbone.experts(pipe)) if steerer is not None else nullcontext():
        while (key := from_leader(None)) is not None:
            sample(pipe, items[key], kwargs, steerer, layout, loop)


def video_row(cfg, item: Item, path: Path, frames, seconds: float, size: int) -> dict:
    return {
        "key": item.key,
        "prompt": item.prompt,
        "prompt_index": item.prompt_index,
        "index": item.index,
        "seed": item.seed,
        **item.image_fields(),
        "path": str(path),
        "bytes": size,
        "backbone": cfg.model.name,
        "steer": cfg.steer.name if cfg.steer.enabled else "none",
        "guidance": cfg.guidance.name,
        "num_frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "steps": cfg.model.steps,
        "guidance_scale": cfg.model.guidance_scale,
        "seconds": round(seconds, 4),
    }

