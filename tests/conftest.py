"""Shared fixtures: composing real configs, running the real CLIs, building the real tiny pipelines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# No test may reach a network: W&B offline, the HF hub offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)


def compose(overrides=(), config_name="config"):
    """A config composed exactly as the CLIs compose it (same tree, same schemas); config_name="analyze" is
    stas.analyze's primary config."""
    from stas.cli import compose_config

    return compose_config(overrides, config_name=config_name)


@pytest.fixture
def cfg_of():
    return compose


def run_cli(module: str, *args, cwd: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` as a user would; returns the finished process (text output)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def build_twin(name: str) -> tuple:
    """(cfg, backbone, pipe) of a tiny twin, its progress bar off."""
    from stas.backbones import load_pipeline
    from stas.config import validate

    cfg = compose([f"model={name}", "logger=none"])
    backbone = validate(cfg)
    pipe = load_pipeline(cfg.model, backbone)
    pipe.set_progress_bar_config(disable=True)
    return cfg, backbone, pipe


def landing_tokens(embed, latents: torch.Tensor, where: tuple[int, int, int], frame_axis: int) -> list[int]:
    """The tokens of `embed(latents)` ((1, tokens, dim): a transformer's patch embedding or input projection) that
    change when the latent value at `where` (latent frame, row, column) changes; the latents' frame axis is
    `frame_axis` (the channels are the other of axes 1 and 2). How the families' layout tests find where a latent
    position lands."""
    planted = latents.clone()
    index = [0, slice(None), slice(None), where[1], where[2]]
    index[frame_axis] = where[0]
    planted[tuple(index)] += 10.0
    with torch.no_grad():
        changed = (embed(planted) - embed(latents)).abs().amax(dim=-1)[0] > 0
    return torch.nonzero(changed).flatten().tolist()


class TwinCache(dict):
    """{model name: (cfg, backbone, pipe)}, each twin built on first use."""

    def __missing__(self, name: str):
        self[name] = build_twin(name)
        return self[name]


@pytest.fixture(scope="session")
def tiny_pipelines():
    """The tiny twins, each built once per session (on first use): {model name: (cfg, backbone, pipe)}."""
    return TwinCache()


def pytest_collection_modifyitems(config, items):
    """The VBench integration suite runs only when asked for by name (-m vbench_full): it installs a separate
    environment (gigabytes) and scores with every dimension, too much for the default run and the quick tier."""
    if "vbench_full" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="VBench integration suite: run it with -m vbench_full (docs/evaluation.md)")
    for item in items:
        if "vbench_full" in item.keywords:
            item.add_marker(skip)
