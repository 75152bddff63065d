"""Experiment tracking: Weights & Biases (offline by default) or nothing, behind one small interface."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


class RunLogger:
    """One W&B run per job; `finish()` always runs (use it as a context manager) so multirun jobs never merge."""

    def __init__(self, cfg, run_dir: Path, job_type: str):
        """A run's logger: group = the experiment name (else model/steer), tags = model and steering preset, the
        resolved config."""
        group = cfg.logger.group or cfg.get("name") or f"{cfg.model.name}/{cfg.steer.name}"
        self._start(cfg.logger, run_dir, job_type, group, OmegaConf.to_container(cfg, resolve=True),
                    [cfg.model.name, cfg.steer.name])

    @classmethod
    def for_directory(cls, logger_cfg, directory: Path, job_type: str, group: str, config: dict) -> "RunLogger":
        """A logger for a stage that spans runs (e.g. aggregating a sweep into tables)."""
        logger = cls.__new__(cls)
        logger._start(logger_cfg, directory, job_type, group, config, [])
        return logger

    def _start(self, logger_cfg, directory: Path, job_type: str, group: str, config: dict, tags: list[str]):
        self.run = None
        self.videos_logged = 0
        self.max_videos = logger_cfg.log_videos
        if logger_cfg.backend == "none":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=group,
            job_type=job_type,
            tags=list(logger_cfg.tags) + tags,
            name=f"{group}/{job_type}/{Path(directory).name}",
            config=config,
            dir=str(directory),
            mode=logger_cfg.mode,
            settings=wandb.Settings(init_timeout=logger_cfg.init_timeout),
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()

    def log(self, data: dict) -> None:
        if self.run is not None:
            self.run.log(data)

    def log_video(self, path: Path, caption: str, fps: int) -> None:
        if self.run is not None and self.videos_logged < self.max_videos:
            self.run.log({"samples": self.wandb.Video(str(path), caption=caption, format="mp4")})
            self.videos_logged += 1

    def log_table(self, name: str, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        columns = sorted({key for row in rows for key in row})
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        self.run.log({name: self.wandb.Table(columns=columns, data=data)})

    def log_image(self, name: str, path: Path) -> None:
        if self.run is not None:
            self.run.log({name: self.wandb.Image(str(path))})

    def summary(self, data: dict) -> None:
        if self.run is not None:
            self.run.summary.update(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _cell(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
