"""Loading real checkpoints: from the cache without the hub, and one fast, clear message when neither has it."""

import os
import subprocess
import sys

import pytest

from stas.backbones import backbone_from_config, load_pipeline

from conftest import compose

WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@pytest.mark.slow
def test_uncached_model_with_the_hub_unreachable_fails_at_once(tmp_path):
    """HF_HUB_OFFLINE unset, an empty HF_HOME and a hub that refuses connections (a closed local port, so the test
    never downloads anything where there is a network): the hub client would retry every file for ~25 s with doubled
    warnings; stas checks the cache first and says what to do."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", *PROXIES)}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "stas.run", "model=wan21_1.3b", "logger=none", "eval=none",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"stas.run: error: could not load '{WAN}': it is not in the local Hugging Face "
                                    "cache and the hub could not be reached.")
    assert f"looked in: {tmp_path / 'hf' / 'hub'}" in result.stderr and f"hf download {WAN}" in result.stderr
    assert "no snapshot of revision main in the cache" in result.stderr
    assert "Retry" not in result.stderr and "Traceback" not in result.stderr


def test_cached_model_loads_with_the_hub_unreachable(tiny_pipelines, tmp_path, monkeypatch):
    """The cache check refuses nothing that is there: a checkpoint in the cache (here the tiny Wan twin saved under
    the real model's id) loads offline."""
    import huggingface_hub.constants as constants

    _, _, pipe = tiny_pipelines["tiny_wan21"]
    repo = tmp_path / "hub" / f"models--{WAN.replace('/', '--')}"
    revision = "0" * 40
    pipe.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert constants.HF_HUB_OFFLINE  # conftest: no test reaches a network
    cfg = compose(["model=wan21_1.3b", "model.num_layers=2", "model.hidden_dim=32", "model.device=cpu"])
    loaded = load_pipeline(cfg.model, backbone_from_config(cfg.model))
    assert type(loaded).__name__ == "WanPipeline" and len(loaded.transformer.blocks) == 2
