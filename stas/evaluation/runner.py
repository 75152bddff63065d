"""Scoring a run directory: every video of this shard by every configured evaluator, cached per video.

The evaluators are the registered ones named in eval.evaluators (stas.evaluation.base: the interface; the modules of
stas/evaluation/evaluators/: pixel, dino, clip, vbench, ...); this module does what is the same for all of them. A
video already scored by a scorer is skipped, so re-running is cheap and idempotent; videos that failed (error rows)
are tried again. Each video is decoded once: video-level scorers score its frames there and then, set-level ones get
the videos that decode, all at once, afterwards. A scorer that cannot run here (weights or packages missing) is
skipped with the reason, the others proceed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from stas.backbones import backbone_from_config, resolve_device
from stas.core.selection import shard_of
from stas.errors import UserError
from stas.evaluation.base import EvalContext, Evaluator, EvaluatorUnavailable, Measurements, NoValue, Scorer
from stas.evaluation.records import (AGGREGATE_FILE, METRICS_STAGE, Video, aggregate_metrics, error_row, excluded_row,
                                     metric_row, row_key, summary_values)
from stas.evaluation.registry import evaluator_class
from stas.prompts import shard_items
from stas.rundir import (MANIFEST_FILE, METRIC_FIELDS, VIDEOS_DIR, JsonlRecords, atomic_write_json, checked_records,
                         read_manifest, shard_file, video_path)
from stas.video import file_sha256, read_mp4


def read_video(path: Path) -> np.ndarray:
    """(T, H, W, 3) uint8 frames; ValueError when the file cannot be decoded or has fewer than 2 frames."""
    frames = read_mp4(path)
    if frames.shape[0] < 2:
        raise ValueError(f"{path.name} has {frames.shape[0]} frame; frame similarity needs at least 2")
    return frames


def run_videos(run_dir: Path, index: int, count: int) -> tuple[list[Video], int]:
    """This shard's videos (every count-th item of the run's manifest, as generation shards them) that exist, and
    how many of its videos are not generated yet."""
    items = shard_items(read_manifest(run_dir), index, count)
    videos = [Video(row["file"], manifest_video(run_dir, row), row["prompt"], row["seed"]) for row in items]
    present = [replace(video, sha256=file_sha256(video.path)) for video in videos if video.path.is_file()]
    return present, len(videos) - len(present)


def manifest_video(run_dir: Path, row: dict) -> Path:
    """Where the video of a manifest row is; its `file` must be a plain file name in videos/ (it also names the
    video's link for VBench)."""
    where = f"{run_dir / MANIFEST_FILE}, row with key {row['key']!r}"
    if Path(row["file"]).name != row["file"]:
        raise UserError(f"{where}: file {row['file']!r} is not a plain file name (no folders, no '..')")
    return video_path(run_dir, f"{VIDEOS_DIR}/{row['file']}", where)


@dataclass
class EvaluationSummary:
    run_dir: Path
    shard: tuple[int, int]
    videos: int
    not_generated: int
    rows_path: Path
    aggregate_path: Path | None
    scored: dict[str, int] = field(default_factory=dict)  # scorer (pixel, dino, clip, vbench/<dim>): videos scored now
    cached: dict[str, int] = field(default_factory=dict)  # scorer: videos scored by an earlier run
    errors: dict[str, int] = field(default_factory=dict)  # scorer: videos that failed now
    excluded: dict[str, int] = field(default_factory=dict)  # scorer: videos scored now that the tool gave no value
    skipped: dict[str, str] = field(default_factory=dict)  # scorer: why it could not run
    notes: list[str] = field(default_factory=list)
    seconds_per_video: dict[str, float] = field(default_factory=dict)
    aggregate: dict = field(default_factory=dict)

    @property
    def ran_anything(self) -> bool:
        return bool(self.scored or self.cached or self.errors or self.excluded)

    def __str__(self) -> str:
        index, count = self.shard
        shard = f" (shard {index + 1}/{count})" if count > 1 else ""
        lines = [f"evaluation of {self.videos} video(s) in {self.run_dir}{shard}"]
        if self.not_generated:
            lines.append(f"  {self.not_generated} video(s) of this run are not generated yet")

        def counts(table):
            return ", ".join(f"{name} {n}" for name, n in table.items())

        if self.scored:
            speed = ", ".join(f"{name} {s:.2f}" for name, s in self.seconds_per_video.items())
            lines.append(f"  scored now: {counts(self.scored)} (seconds per video: {speed})")
        if self.cached:
            lines.append(f"  already scored (cached): {counts(self.cached)}")
        if self.excluded:
            lines.append(f"  no value by the tool's own definition (rows with value null and `excluded`, not scored "
                         f"again): {counts(self.excluded)}")
        if self.errors:
            lines.append(f"  errors (rows with value null and an error): {counts(self.errors)}")
        for name, reason in self.skipped.items():
            # With a metrics.json the console gets the first line, the file the whole story.
            shown = reason.splitlines()[0] if self.aggregate_path is not None else reason.replace("\n", "\n    ")
            lines.append(f"  SKIPPED {name}: {shown}")
        if self.skipped and self.aggregate_path is not None:
            lines.append(f"  (what each skipped evaluator lacks, where it comes from and how to place it: "
                         f"\"skipped\" in {self.aggregate_path})")
        lines += [f"  note: {note}" for note in self.notes]
        for name, entry in self.aggregate.get("metrics", {}).items():
            lines.append(f"  {name:<40} {entry.get('pooled', entry['mean']):.4f}  (n={entry['count']})")
        vbench = self.aggregate.get("vbench", {})
        for score in ("quality_score", "semantic_score", "total_score"):
            if score in vbench:
                lines.append(f"  vbench {score:<33} {vbench[score]:.2f} %")
            elif score in vbench.get("withheld", {}):
                lines.append(f"  vbench {score}: withheld, {vbench['withheld'][score]}")
            elif score in vbench.get("missing", {}):
                lines.append(f"  vbench {score}: not computed, needs {len(vbench['missing'][score])} more dimension(s)")
        for dimension, problem in vbench.get("invalid", {}).items():
            lines.append(f"  FLAGGED vbench/{dimension}: raw value {vbench['dimensions'][dimension]!r} {problem} "
                         "(kept in the rows; the scores built on it are withheld)")
        lines.append(f"  rows:      {self.rows_path}")
        if self.aggregate_path is not None:
            lines.append(f"  aggregate: {self.aggregate_path}")
        return "\n".join(lines)


def _bump(table: dict[str, int], name: str) -> None:
    table[name] = table.get(name, 0) + 1


def evaluate_run(cfg, run_dir: Path, logger=None, shard: tuple[int, int] | None = None) -> EvaluationSummary:
    """Score this shard's videos of `run_dir` with `cfg.eval` and write rows (and, unsharded, metrics.json).
    `shard` (index, count): default cfg.shard's."""
    return prepare_evaluation(cfg, run_dir, shard).run(logger)


def prepare_evaluation(cfg, run_dir: Path, shard: tuple[int, int] | None = None) -> RunEvaluation:
    """This shard's evaluation, once the run's manifest and metric rows (untrusted input) are read and checked: a
    UserError comes before anything is written."""
    index, count = shard_of(cfg.shard) if shard is None else shard
    videos, not_generated = run_videos(run_dir, index, count)
    if not videos:
        which = f" (shard {index + 1}/{count})" if count > 1 else ""
        raise UserError(f"{run_dir / VIDEOS_DIR} holds none of the {not_generated} video(s) of this run{which}: "
                        "generate them first (python -m stas.run)")
    return RunEvaluation(cfg, run_dir, videos, (index, count), not_generated)


class RunEvaluation:
    """The state of one evaluate_run: the rows file, what each scorer still has to do, the summary.

    Scorers (stas.evaluation.base.Scorer) are named like the summary names them: `pixel`, `dino`, `clip`,
    `vbench/<dimension>`.
    """

    def __init__(self, cfg, run_dir: Path, videos: list[Video], shard: tuple[int, int], not_generated: int):
        self.cfg = cfg
        self.options = cfg.eval
        self.videos = videos
        self.shard = shard
        # Rows of every layout (unsharded, any shard count) count as done, as generation counts videos; checked
        # before this shard's file is opened (and perhaps repaired).
        self.known = {row_key(row): row for row in checked_records(run_dir, METRICS_STAGE, METRIC_FIELDS)}
        self.records = JsonlRecords(shard_file(run_dir, METRICS_STAGE, *shard), key=row_key)
        self.known.update(self.records.rows)
        self.summary = EvaluationSummary(run_dir, shard, len(videos), not_generated, self.records.path,
                                         run_dir / AGGREGATE_FILE if shard[1] == 1 else None)
        self.compression = self.options.temporal_compression or backbone_from_config(cfg.model).temporal_compression
        context = EvalContext(self.options, resolve_device(self.options.device, "eval.device"), self.compression,
                              run_dir, shard, notes=self.summary.notes, skipped=self.summary.skipped)
        # Video-level evaluators first (they score while the videos are decoded), then the set-level ones.
        classes = sorted((evaluator_class(name) for name in self.options.evaluators), key=lambda cls: cls.batched)
        self.evaluators: list[Evaluator] = [cls(context) for cls in classes]
        self.scorers: dict[str, tuple[Evaluator, Scorer]] = {}  # scorer name: its evaluator and itself
        self.todo: dict[str, list[Video]] = {}  # scorer: the videos it still has to score
        self.readable: dict[str, list[Video]] = defaultdict(list)  # set-level scorer: its videos that decode
        self.seconds: dict[str, float] = defaultdict(float)
        self.planned = False

    def run(self, logger=None) -> EvaluationSummary:
        if not self.planned:
            self.plan()
        self.score_decoded()
        self.score_sets()
        return self.finish(logger)

    def _is_scored(self, video: Video, scorer: Scorer) -> bool:
        row = self.known.get(row_key({"video": video.name, "evaluator": scorer.evaluator,
                                      "metric": scorer.done_metric}))
        done = row is not None and (row.get("value") is not None or bool(row.get("excluded")))
        return (done and row.get("settings") == scorer.settings
                and row.get("video_sha256") == video.sha256)  # scored from these very bytes, not an older video

    def _forget(self, video: Video, scorer: Scorer) -> None:
        """Drop a video's rows of a scorer before it is scored again (other settings, or an error before)."""
        prefix = row_key({"video": video.name, "evaluator": scorer.evaluator, "metric": ""})
        for rows in (self.records.rows, self.known):
            for key in [key for key in rows if key.startswith(prefix) and scorer.owns(key[len(prefix):])]:
                del rows[key]

    def _append(self, row: dict) -> None:
        self.records.append(row)
        self.known[row_key(row)] = row

    def _write(self, scorer: Scorer, video: Video, measurements: Measurements) -> None:
        self._forget(video, scorer)
        for metric, (value, weight) in measurements.items():
            row = metric_row(video, scorer.evaluator, metric, value, weight)
            if scorer.settings is not None:
                row["settings"] = scorer.settings
            self._append(row)

    def _error(self, scorer: Scorer, video: Video, error: str) -> None:
        self._append(error_row(video, scorer.evaluator, scorer.error_metric, error))
        _bump(self.summary.errors, scorer.name)

    def has_work(self) -> bool:
        """After `plan`: whether any scorer that can run here has a video left to score."""
        return any(self.todo.values())

    def plan(self) -> None:
        """Each evaluator's scorers and the videos they still have to score; then each scorer with work gets ready
        (one that cannot run here is skipped with the reason)."""
        self.planned = True
        summary = self.summary
        for evaluator in self.evaluators:
            for scorer in evaluator.scorers(self.videos):
                members = self.videos if scorer.videos is None else list(scorer.videos)
                self.scorers[scorer.name] = (evaluator, scorer)
                self.todo[scorer.name] = [video for video in members if not self._is_scored(video, scorer)]
                summary.cached[scorer.name] = len(members) - len(self.todo[scorer.name])
        summary.cached = {name: n for name, n in summary.cached.items() if n}
        for name in [name for name, videos in self.todo.items() if videos]:
            evaluator, scorer = self.scorers[name]
            try:
                evaluator.prepare(scorer)
            except EvaluatorUnavailable as err:
                summary.skipped[name] = str(err)
                del self.todo[name]

    def score_decoded(self) -> None:
        """Decode each video once: video-level scorers score it here, set-level ones get it only if it decodes."""
        pending = {name: {v.name for v in videos} for name, videos in self.todo.items()}
        to_read = [v for v in self.videos if any(v.name in names for names in pending.values())]
        for video in tqdm(to_read, desc="evaluating videos", disable=not self.cfg.progress or not to_read):
            wanted = [self.scorers[name] for name, names in pending.items() if video.name in names]
            try:
                frames = read_video(video.path)
            except ValueError as err:
                for _, scorer in wanted:
                    self._error(scorer, video, str(err))
                continue
            for evaluator, scorer in wanted:
                if evaluator.batched:
                    self.readable[scorer.name].append(video)
                    continue
                start = time.perf_counter()
                self._write(scorer, video, evaluator.score_video(scorer, video, frames))
                self.seconds[scorer.name] += time.perf_counter() - start
                _bump(self.summary.scored, scorer.name)

    def score_sets(self) -> None:
        """Each set-level scorer on all of its videos that decode, at once."""
        for name, videos in self.readable.items():
            evaluator, scorer = self.scorers[name]
            start = time.perf_counter()
            try:
                results = evaluator.score_videos(scorer, videos)
            except EvaluatorUnavailable as err:
                self.summary.skipped[name] = str(err)
                continue
            self.seconds[name] += time.perf_counter() - start
            for video in videos:
                result = results.get(video.name, f"{evaluator.name} returned no result for this video")
                if isinstance(result, str):
                    self._error(scorer, video, result)
                elif isinstance(result, NoValue):
                    self._forget(video, scorer)
                    row = excluded_row(video, scorer.evaluator, scorer.done_metric, result.reason)
                    self._append(row if scorer.settings is None else {**row, "settings": scorer.settings})
                    _bump(self.summary.excluded, name)
                else:
                    self._write(scorer, video, result)
                    _bump(self.summary.scored, name)

    def finish(self, logger) -> EvaluationSummary:
        """Compact the rows in video order, aggregate them, write metrics.json (unsharded), log to W&B."""
        summary = self.summary
        done = {name: summary.scored.get(name, 0) + summary.excluded.get(name, 0)
                for name in {**summary.scored, **summary.excluded}}
        summary.seconds_per_video = {name: self.seconds[name] / n for name, n in done.items()}
        order = {video.name: n for n, video in enumerate(self.videos)}
        self.records.compact(order=lambda row: (order.get(row["video"], len(order)), row["evaluator"], row["metric"]))
        rows = list(self.known.values())  # this file's and every other layout's rows
        summary.aggregate = aggregate_metrics(rows)
        if summary.aggregate_path is not None:
            atomic_write_json(summary.aggregate_path, {
                **summary.aggregate,
                "skipped": {name: reason.splitlines() for name, reason in summary.skipped.items()},
                "temporal_compression": self.compression,
                "eval": OmegaConf.to_container(self.options, resolve=True),
            })
        else:
            summary.notes.append("sharded run: metrics.json is written when the shards' rows are merged "
                                 "(stas.evaluation.aggregate_metrics on their union)")
        if logger is not None:
            logger.log_table("metrics", rows)
            logger.summary(summary_values(summary.aggregate))
        return summary
