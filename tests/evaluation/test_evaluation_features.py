"""DINO / CLIP frame features: VBench's preprocessing and formulas, checked against VBench's own code on the same
random-weight models and the same mp4s; weights from a checkpoint file; a clear message when weights are missing."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from stas.config import ConfigError, validate
from stas.evaluation import evaluate_run
from stas.evaluation.features import (FEATURE_MODELS, WeightsMissing, clip_preprocess, dino_preprocess,
                                      make_features)
from stas.evaluation.records import METRICS_FILE

from conftest import compose
from evaluation_helpers import chunky_frames, import_from, make_run

CPU = torch.device("cpu")


def frames_like_vbench(seed=0):
    """What vbench.utils.load_video returns: (T, 3, H, W) float32 in 0..255."""
    return torch.from_numpy(chunky_frames(seed, frames=3, height=48, width=80)).permute(0, 3, 1, 2).float()


def test_preprocessing_is_vbench_transforms():
    from vbench.utils import clip_transform, dino_transform

    frames = frames_like_vbench()
    assert torch.equal(dino_preprocess(frames), dino_transform(224)(frames))
    assert dino_preprocess(frames).shape == (3, 3, 224, 373)  # shorter side 224, no crop
    assert torch.equal(clip_preprocess(frames), clip_transform(224)(frames))
    assert clip_preprocess(frames).shape == (3, 3, 224, 224)


@pytest.fixture(scope="module")
def random_models():
    cfg = compose(["logger=none", "eval.dino.random_weights=true", "eval.clip.random_weights=true"])
    return cfg, {name: make_features(name, cfg.eval, CPU) for name in ("dino", "clip")}


def test_dino_square_input_is_timms_own_forward(random_models):
    dino = random_models[1]["dino"].encoder
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(dino(images), dino.vit(images), atol=1e-6)


def test_dino_matches_facebookresearch_dino_when_vbench_has_it(random_models):
    """VBench loads DINO from its cached facebookresearch/dino checkout; where that is present, our timm-based model
    with the same weights must give the same CLS features, on non-square frames too."""
    from stas.evaluation.features import vbench_cache_dir

    repo = vbench_cache_dir() / "dino_model" / "facebookresearch_dino_main"
    if not (repo / "vision_transformer.py").is_file():
        pytest.skip(f"facebookresearch/dino is not in VBench's cache ({repo})")
    dino = random_models[1]["dino"].encoder
    reference = import_from(repo, "vision_transformer").vit_base(patch_size=16, num_classes=0).eval()
    reference.load_state_dict(dino.vit.state_dict())
    with torch.no_grad():
        for shape in ((224, 224), (224, 398), (230, 230)):
            images = torch.randn(1, 3, *shape)
            assert torch.allclose(dino(images), reference(images), atol=2e-5)


@pytest.mark.slow
def test_consistency_equals_vbench_code_on_same_weights_and_videos(tmp_path, random_models, monkeypatch):
    cfg, run_dir = make_run(tmp_path, ["prompts.limit=1", "prompts.samples_per_prompt=2", "eval.evaluators=[dino,clip]",
                                       "eval.dino.random_weights=true", "eval.clip.random_weights=true"],
                            # 2 and 3 frames: VBench's pair-weighted value differs from the mean over videos
                            frames=lambda seed: chunky_frames(seed, frames=2 + seed, height=48, width=56))
    summary = evaluate_run(cfg, run_dir)
    assert summary.scored == {"dino": 2, "clip": 2}
    assert any("RANDOM weights" in note for note in summary.notes)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    ours = {(r["evaluator"], r["video"]): r["value"] for r in rows if r["metric"] == "consistency"}
    paths = sorted(str(p) for p in (run_dir / "videos").glob("*.mp4"))
    assert len(paths) == 2

    from vbench.subject_consistency import subject_consistency

    models = random_models[1]
    value, per_video = subject_consistency(models["dino"].encoder, paths, "cpu", read_frame=False)
    for result in per_video:
        assert ours[("dino", Path(result["video_path"]).name)] == pytest.approx(result["video_results"], abs=1e-5)
    assert summary.aggregate["metrics"]["dino/consistency"]["pooled"] == pytest.approx(value, abs=1e-5)

    # vbench.background_consistency imports OpenAI's `clip` package at the top but its function only calls
    # clip_model.encode_image, which our open_clip encoder provides; without `clip` installed an empty module lets
    # VBench's own code run.
    if importlib.util.find_spec("clip") is None:
        monkeypatch.setitem(sys.modules, "clip", types.ModuleType("clip"))
    from vbench.background_consistency import background_consistency

    clip_model = types.SimpleNamespace(encode_image=models["clip"].encoder)
    with torch.no_grad():
        value, per_video = background_consistency(clip_model, None, paths, "cpu", read_frame=False)
    for result in per_video:
        assert ours[("clip", Path(result["video_path"]).name)] == pytest.approx(result["video_results"], abs=1e-5)
    assert summary.aggregate["metrics"]["clip/consistency"]["pooled"] == pytest.approx(value, abs=1e-5)


@pytest.mark.slow
def test_weights_from_a_checkpoint_file(tmp_path, random_models):
    cfg, models = random_models
    for name in ("dino", "clip"):
        module = models[name].encoder.vit if name == "dino" else models[name].encoder.visual
        changed = {key: value + 1.0 if value.is_floating_point() else value
                   for key, value in module.state_dict().items()}
        checkpoint = tmp_path / f"{name}.pth"
        if name == "dino":
            torch.save(changed, checkpoint)  # the key names of DINO's own release and of timm
        else:
            import open_clip

            full = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).state_dict()
            full.update({f"visual.{key}": value for key, value in changed.items()})
            torch.save(full, checkpoint)
        options = cfg.eval.copy()
        options[name].random_weights = False
        options[name].checkpoint = str(checkpoint)
        loaded = make_features(name, options, CPU)
        state = (loaded.encoder.vit if name == "dino" else loaded.encoder.visual).state_dict()
        assert all(torch.equal(state[key], changed[key]) for key in changed)
        assert str(checkpoint) in loaded.note


def test_missing_weights_say_what_where_and_how(tmp_path, monkeypatch, random_models):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "vbench"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = random_models[0]
    options = cfg.eval.copy()
    for name in ("dino", "clip"):
        options[name].random_weights = False
        with pytest.raises(WeightsMissing) as caught:
            make_features(name, options, CPU)
        message = str(caught.value)
        model = FEATURE_MODELS[name]
        for needle in (model.hf_repo, model.release_url, f"eval.{name}.checkpoint", str(tmp_path / "hf"),
                       str(tmp_path / "vbench"), "offline"):
            assert needle in message
    bad = cfg.copy()
    bad.eval.evaluators = ["dino"]
    bad.eval.dino.checkpoint = str(tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match=r"eval\.dino\.checkpoint='.*nope\.pth': no such file"):
        validate(bad)
