"""The evaluator interface: what an evaluator is, what it gets, what it returns, and the registry it joins.

An evaluator is a class with a `name` (the `evaluator` of its metric rows and its entry in `eval.evaluators`),
decorated with `register`, in a module of `stas/evaluation/evaluators/` (every module there is imported). It may have
a config node `eval.<name>` (the dataclass `config`, ranges of its numeric fields in `bounds`, other checks in
`check_config`). The runner (stas.evaluation.runner) does the rest for every evaluator alike: which videos are still
to score (resume), decoding each video once, error rows for videos that do not decode, writing rows, the summary.

What an evaluator scores comes in *scorers*: by default one, the evaluator itself; VBench has one per dimension
(`vbench/<dimension>`), each with its own resume state and its own line in the summary. A scorer is either
- video-level (`batched = False`): `score_video(scorer, video, frames)` gets the decoded frames of one video, or
- set-level (`batched = True`): `score_videos(scorer, videos)` gets every video it still has to score at once
  (VBench runs one process per dimension over all of them; FVD needs the whole set).
Both return measurements, {metric: (value, weight)}: `weight` (or None) is what a pooled aggregate counts the value
with (frame pairs, frames; see stas.evaluation.records). A set-level scorer may instead return `NoValue(reason)` for
a video its tool scored and, by its own definition, gave no value (VBench's color when the object is never
detected): that video gets a row with value null and `excluded` = reason, counts as done and is not an error.

An evaluator that cannot run here (weights or packages missing, its tool failed) raises `EvaluatorUnavailable` from
`prepare` or `score_videos`; it is skipped with that message and the others proceed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stas.errors import UserError
from stas.evaluation.records import Video

Measurements = dict[str, tuple[float | None, int | None]]  # metric: (value, weight or None)
NAME = re.compile(r"[a-z][a-z0-9_]*")
RESERVED = ("evaluators", "device", "batch_size", "temporal_compression")  # eval.* keys shared by all evaluators


class EvaluatorUnavailable(UserError):
    """An evaluator (or one of its scorers) cannot run here; the message says why and how to fix it."""


@dataclass(frozen=True)
class NoValue:
    """A set-level result: the tool scored this video and, by its own definition, gives it no value (VBench's color
    leaves out a video where the object is never detected). Its row has value null and `excluded` = reason; it
    counts as scored (not tried again, not an error) and stays out of the aggregate's values."""

    reason: str


@dataclass(frozen=True)
class Scorer:
    """One thing an evaluator scores, with its own resume state and summary line.

    `done_metric` is a metric every successful scoring of a video writes: a video with a non-null row of it, computed
    from the same bytes with the same `settings`, is not scored again. `part` names the scorer inside its evaluator
    (a VBench dimension); a scorer without one writes all of its evaluator's metrics, and a video scored again loses
    its evaluator's old rows (a part replaces only the rows of its own metric, the part).
    """

    evaluator: str
    done_metric: str
    part: str | None = None
    settings: str | None = None  # what the values depend on besides the video; rows of other settings are redone
    videos: tuple[Video, ...] | None = None  # the videos it scores; None: every video of the run (this shard's)

    @property
    def name(self) -> str:
        """The scorer in the summary and in metrics.json's `skipped`: `evaluator` or `evaluator/part`."""
        return self.evaluator if self.part is None else f"{self.evaluator}/{self.part}"

    @property
    def error_metric(self) -> str:
        """The metric of a video's error row (it cannot be decoded, or the evaluator gave no result)."""
        return self.part if self.part is not None else "error"

    def owns(self, metric: str) -> bool:
        """Whether a row of this evaluator with `metric` was written by this scorer."""
        return self.part is None or metric == self.part


@dataclass
class EvalContext:
    """What every evaluator of one evaluation shares. `notes` and `skipped` are the summary's own: an evaluator adds a
    note (shown in the summary) or skips a scorer by name with the reason (`skipped[scorer.name] = why`)."""

    options: Any  # the `eval` config node
    device: Any  # torch.device the models run on (eval.device resolved)
    temporal_compression: int  # latent chunking: eval.temporal_compression or the run's backbone
    run_dir: Path
    shard: tuple[int, int]  # (index, count)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class Evaluator:
    """Base of every evaluator; subclasses set `name` and implement `score_video` or (batched) `score_videos`."""

    name: ClassVar[str] = ""
    config: ClassVar[type | None] = None  # dataclass of the node eval.<name>; None: no node
    bounds: ClassVar[dict[str, tuple[int, int]]] = {}  # numeric fields of that node: [low, high]
    batched: ClassVar[bool] = False  # True: score_videos gets all its videos at once
    done_metric: ClassVar[str] = ""  # for the default scorers(): a metric every successful scoring writes

    def __init__(self, context: EvalContext):
        self.context = context
        self.options = context.options[self.name] if self.config is not None else None  # its node

    @classmethod
    def check_config(cls, options, evaluation) -> None:
        """Refuse, with a ConfigError naming the field (`eval.<name>.<field>`), the value and what is allowed, a node
        this evaluator cannot run with. `options` is its node (None without one), `evaluation` the whole `eval` node.
        Called at start-up when the evaluator is in eval.evaluators (the ranges in `bounds` are checked always)."""

    def settings(self) -> str | None:
        """What the values depend on besides the video (kept in the rows: rows of other settings are scored again);
        None when nothing."""
        return None

    def scorers(self, videos: list[Video]) -> list[Scorer]:
        """What this evaluator scores in this run (its own checks, e.g. a probe, may skip some; see EvalContext)."""
        if not self.done_metric:
            raise NotImplementedError(f"{type(self).__name__} sets no done_metric and does not override scorers()")
        return [Scorer(self.name, self.done_metric, settings=self.settings())]

    def prepare(self, scorer: Scorer) -> None:
        """Get ready to score (load weights, ...); called once per scorer that has videos to score, before any is
        scored. Raise EvaluatorUnavailable when it cannot run here."""

    def score_video(self, scorer: Scorer, video: Video, frames) -> Measurements:
        """Video-level: the measurements of one video from its frames, (T, H, W, 3) uint8 with T >= 2."""
        raise NotImplementedError(f"{type(self).__name__} is video-level (batched = False): implement score_video")

    def score_videos(self, scorer: Scorer, videos: list[Video]) -> dict[str, Measurements | str | NoValue]:
        """Set-level (batched = True): {video name: measurements, or why that video could not be scored, or
        NoValue(why the tool gives it no value)} for `videos` (each decodes); a video left out gets an error row.
        Raise EvaluatorUnavailable when the whole scorer failed."""
        raise NotImplementedError(f"{type(self).__name__} is set-level (batched = True): implement score_videos")


REGISTRY: dict[str, type[Evaluator]] = {}  # name: class, in the order registered (stas.evaluation.registry)


def register(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: make `cls` available as eval.evaluators entry `cls.name`."""
    name = cls.name
    if not (isinstance(name, str) and NAME.fullmatch(name)) or name in RESERVED:
        raise ValueError(f"{cls.__qualname__}.name={name!r}: an evaluator name is lower-case letters, digits and _, "
                         f"starting with a letter, and none of {', '.join(RESERVED)}")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"two evaluators are named {name!r}: {REGISTRY[name].__qualname__} "
                         f"({REGISTRY[name].__module__}) and {cls.__qualname__} ({cls.__module__})")
    method = "score_videos" if cls.batched else "score_video"
    if getattr(cls, method) is getattr(Evaluator, method):
        raise TypeError(f"{cls.__qualname__} (batched = {cls.batched}) must implement {method}")
    REGISTRY[name] = cls
    return cls
