"""The `vbench` evaluator: the real VBench, one scorer (`vbench/<dimension>`) per dimension.

Set-level: each dimension runs in its own process over every video it still has to score (stas.evaluation.vbench
drives the worker). A probe first skips the dimensions whose weights or packages are missing, with how to get them,
and sends those whose packages are too new here to eval.vbench.separate_python when it is set;
in vbench_standard mode a dimension scores only the videos of its own prompts. Rows: metric = the dimension, with
the weight VBench pools the value with.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from stas.errors import ConfigError
from stas.evaluation.base import Evaluator, EvaluatorUnavailable, Measurements, NoValue, Scorer, register
from stas.evaluation.records import Video
from stas.evaluation.scores import DIMENSIONS, NEED_STANDARD_PROMPTS
from stas.evaluation.vbench import VBenchError, VBenchRunner

VBENCH_MODES = ("custom_input", "vbench_standard")
VBENCH_LOGS = "vbench"  # RUN_DIR/vbench/<dimension>.log


@dataclass
class VBenchEvalConfig:
    mode: str = "custom_input"  # custom_input | vbench_standard
    dimensions: List[str] = field(default_factory=list)  # VBench dimension names, e.g. [temporal_flickering]
    python: Optional[str] = None  # the interpreter that has vbench installed; default: this one
    # a separate environment with VBench's own pins (python -m stas.evaluation.vbench_env PATH: PATH/bin/python); the
    # dimensions whose packages are too new in `python` (human_action, scene beside this stack) run there
    separate_python: Optional[str] = None
    cache_dir: Optional[str] = None  # VBench's weights cache; default: $VBENCH_CACHE_DIR, else ~/.cache/vbench
    full_info: Optional[str] = None  # default: the VBench_full_info.json shipped with vbench
    timeout: Optional[int] = None  # seconds per dimension


@register
class VBench(Evaluator):
    name = "vbench"
    config = VBenchEvalConfig
    batched = True

    def __init__(self, context):
        super().__init__(context)
        self.runner = VBenchRunner(self.options, context.options.device, context.run_dir / VBENCH_LOGS)

    @classmethod
    def check_config(cls, options, evaluation) -> None:
        if options.mode not in VBENCH_MODES:
            raise ConfigError(f"eval.vbench.mode={options.mode!r} is not allowed; allowed: {', '.join(VBENCH_MODES)}")
        if not options.dimensions:
            raise ConfigError(f"eval.vbench.dimensions is empty; name at least one of: {', '.join(DIMENSIONS)}")
        for dimension in options.dimensions:
            if dimension not in DIMENSIONS:
                raise ConfigError(f"eval.vbench.dimensions contains {dimension!r}, which is not a VBench dimension; "
                                  f"allowed: {', '.join(DIMENSIONS)}")
            if options.mode == "custom_input" and dimension in NEED_STANDARD_PROMPTS:
                raise ConfigError(f"eval.vbench.dimensions contains {dimension!r}, which VBench scores only on its own "
                                  "prompts: use eval.vbench.mode=vbench_standard (with prompts=vbench)")
        for field_name in ("python", "separate_python"):
            python = options[field_name]
            if python and not shutil.which(python):
                raise ConfigError(f"eval.vbench.{field_name}={python!r}: no such executable")
        if options.full_info and not Path(options.full_info).is_file():
            raise ConfigError(f"eval.vbench.full_info={options.full_info!r}: no such file")
        if options.timeout is not None and options.timeout < 1:
            raise ConfigError(f"eval.vbench.timeout={options.timeout!r} must be >= 1")

    def scorers(self, videos: list[Video]) -> list[Scorer]:
        """A scorer per dimension that can run here (the probe skips the others, saying what they lack; when VBench
        itself cannot run, one `vbench` entry says why)."""
        dimensions = list(self.options.dimensions)
        try:
            routes = self.runner.plan(dimensions)
        except VBenchError as err:  # VBench as a whole cannot run here (not installed, ...): say it once
            self.context.skipped[self.name] = f"all {len(dimensions)} dimension(s): {err}"
            return []
        scorers = []
        for dimension in dimensions:
            scorer = Scorer(self.name, done_metric=dimension, part=dimension)
            if routes[dimension].problems:
                self.context.skipped[scorer.name] = routes[dimension].problems
                continue
            if routes[dimension].separate:
                self.context.notes.append(f"{scorer.name}: {routes[dimension].describe()}")
            if self.options.mode == "vbench_standard":
                suite = self.runner.standard_videos(dimension)
                members = tuple(video for video in videos if video.name in suite)
                if not members:
                    self.context.notes.append(
                        f"{scorer.name}: none of this run's videos is in VBench's standard suite for this dimension "
                        "(it scores {prompt}-{index}.mp4 of its own prompts: prompts=vbench)")
                    continue
                scorer = Scorer(self.name, done_metric=dimension, part=dimension, videos=members)
            scorers.append(scorer)
        return scorers

    def score_videos(self, scorer: Scorer, videos: list[Video]) -> dict[str, Measurements | str | NoValue]:
        index, count = self.context.shard
        dimension = scorer.part
        log_name = dimension if count == 1 else f"{dimension}-{index:03d}-of-{count:03d}"
        try:
            answer = self.runner.evaluate(dimension, videos, log_name)
        except VBenchError as err:
            raise EvaluatorUnavailable(f"VBench failed: {err}") from None
        by_video = {result["video"]: {dimension: (result["value"], result["weight"])} for result in answer["videos"]}
        # Each video's result depends on that video alone, so scoring the videos left (cached ones are not handed to
        # VBench again) and pooling every row gives VBench's value on the run's complete set.
        absent = NoValue(answer["left_out"]) if answer.get("left_out") else "VBench returned no result for this video"
        return {video.name: by_video.get(video.name, absent) for video in videos}
