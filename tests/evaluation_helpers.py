"""Helpers of the evaluation tests: run directories (a composed config saved as stas.run saves it, real mp4s) and
loading reference code (VBench's scripts, DINO's model) from a folder."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
from omegaconf import OmegaConf

from stas.evaluation.similarity import chunk_of
from stas.generation import PARTIAL_DIR, VIDEOS_DIR, run_items
from stas.rundir import claim_run_dir
from stas.video import write_mp4

from conftest import compose


def chunky_frames(seed: int, frames: int = 17, height: int = 64, width: int = 96, compression: int = 4):
    """A video whose frames barely change inside a latent chunk and jump between chunks (uint8, T x H x W x 3)."""
    rng = np.random.default_rng(seed)
    chunks = chunk_of(frames - 1, compression) + 1
    coarse = rng.uniform(0, 255, (chunks, height // 8, width // 8, 3))
    images = coarse.repeat(8, axis=1).repeat(8, axis=2)
    video = np.stack([images[chunk_of(t, compression)] for t in range(frames)])
    video = video + rng.normal(0, 2, video.shape)
    return np.clip(video, 0, 255).astype(np.uint8)


def make_run(tmp_path, overrides=(), frames=chunky_frames, name="run"):
    """A run directory as stas.run leaves it (.hydra config and overrides, identity, item manifest, videos/), with
    `frames(seed)` as each video instead of a generated one."""
    overrides = ["logger=none", "progress=false", "prompts.limit=2", *overrides]
    cfg = compose(overrides)
    run_dir = tmp_path / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / VIDEOS_DIR).mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    items = run_items(cfg)
    claim_run_dir(run_dir, cfg, [item.manifest_row() for item in items])
    for item in items:
        write_mp4(frames(item.prompt_index * 100 + item.index), run_dir / VIDEOS_DIR / item.filename,
                  cfg.model.fps, run_dir / PARTIAL_DIR)
    return cfg, run_dir


def import_from(folder, name: str):
    """Module `name` from a folder of scripts that import each other by plain name."""
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module
