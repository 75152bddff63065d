"""Generation through the real pipelines: CLI, files, determinism, resume, names, W&B, bad input."""

import json
import os

import numpy as np
import pytest

from stas.backbones import BackboneError, backbone_from_config, load_pipeline
from stas.config import ConfigError
from stas.generation import generate, run_items
from stas.rundir import claim_run_dir
from stas.run import run
from stas.loggers import RunLogger
from stas.video import read_mp4

from conftest import compose

ONE_PROMPT = "prompts.prompts=[a red fox runs through fresh snow]"


def rows_of(run_dir, name="generation.jsonl"):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.mark.slow
def test_three_families_generate_through_the_cli_in_one_multirun(cli, tmp_path):
    result = cli("stas.run", "-m", "model=tiny_wan21,tiny_wan22,tiny_cogvideox", ONE_PROMPT, "logger=none", "eval=none",
                 "model.steps=4", "progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ["tiny_wan21", "tiny_wan22", "tiny_cogvideox"]:
        (run_dir,) = (tmp_path / "sweep").glob(f"*,model={name},*")  # cells named by their overrides
        model = compose([f"model={name}"]).model
        (row,) = rows_of(run_dir)
        assert row["backbone"] == name and row["steer"] == "stas"
        frames = read_mp4(run_dir / row["path"])
        assert frames.shape == (model.num_frames, model.height, model.width, 3)
        assert (row["num_frames"], row["height"], row["width"]) == frames.shape[:3]
        assert row["path"] == "videos/a red fox runs through fresh snow-0.mp4"
        assert row["steering"]["hook_calls"] > 0
        saved = (run_dir / ".hydra" / "config.yaml").read_text()
        assert f"name: {name}" in saved and "${" not in saved  # resolved
        assert json.loads((run_dir / "steering.json").read_text())["layers"] == [0, 1]


def gen(run_dir, *overrides, prompts=None):
    cfg = compose(["logger=none", "progress=false", "model.steps=3", *overrides])
    if prompts is not None:  # set directly: command-line quoting cannot carry a newline
        cfg.prompts.source, cfg.prompts.prompts = "list", prompts
    backbone = backbone_from_config(cfg.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    claim_run_dir(run_dir, cfg, [item.manifest_row() for item in run_items(cfg)])
    with RunLogger(cfg, run_dir, "generate") as logger:
        return generate(cfg, run_dir, backbone, logger)


PROMPTS = "prompts.prompts=[a cat,a dog]"


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_frames(tmp_path):
    gen(tmp_path / "a", PROMPTS)
    gen(tmp_path / "b", PROMPTS)
    for row_a, row_b in zip(rows_of(tmp_path / "a"), rows_of(tmp_path / "b")):
        assert np.array_equal(read_mp4(tmp_path / "a" / row_a["path"]), read_mp4(tmp_path / "b" / row_b["path"]))
    gen(tmp_path / "c", PROMPTS, "seed=5")
    assert not np.array_equal(read_mp4(tmp_path / "a" / rows_of(tmp_path / "a")[0]["path"]),
                              read_mp4(tmp_path / "c" / rows_of(tmp_path / "c")[0]["path"]))


def test_resume_redoes_only_what_is_missing(tmp_path):
    run_dir = tmp_path / "run"
    first = gen(run_dir, PROMPTS, "prompts.samples_per_prompt=2")
    assert (first.generated, first.skipped) == (4, 0)
    rows = rows_of(run_dir)
    assert [(r["prompt"], r["index"], r["seed"]) for r in rows] == [
        ("a cat", 0, 0), ("a cat", 1, 1), ("a dog", 0, 0), ("a dog", 1, 1)]
    deleted = run_dir / rows[1]["path"]
    original = read_mp4(deleted)
    deleted.unlink()
    kept = run_dir / rows[2]["path"]
    kept_mtime = kept.stat().st_mtime_ns
    # a kill in the middle of a record write leaves a torn line: it is dropped, not fatal
    with open(run_dir / "generation.jsonl", "a") as handle:
        handle.write('{"key": "1:1", "prompt": "a d')
    second = gen(run_dir, PROMPTS, "prompts.samples_per_prompt=2")
    assert (second.generated, second.skipped) == (1, 3)
    assert np.array_equal(read_mp4(deleted), original)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert [r["key"] for r in rows_of(run_dir)] == ["0:0", "0:1", "1:0", "1:1"]  # no duplicate, no torn line
    third = gen(run_dir, PROMPTS, "prompts.samples_per_prompt=2")
    assert (third.generated, third.skipped) == (0, 4)
    assert not (run_dir / ".partial").exists()  # no claim left, and the empty folder tidied


def test_another_config_into_the_same_run_dir_is_refused(tmp_path):
    gen(tmp_path, PROMPTS)
    with pytest.raises(ConfigError, match=r"Differing keys: model.steps: existing=3, new=4"):
        gen(tmp_path, PROMPTS, "model.steps=4")


def test_awkward_prompts_get_safe_unique_file_names(tmp_path):
    prompts = ['a "quoted" cat/dog', "line one\nline two", "x" * 300, "x" * 300 + "y", "..hidden", "café au lait"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n\n")
    gen(tmp_path / "run", "model.steps=1", prompts=prompts)
    rows = rows_of(tmp_path / "run")
    assert [r["prompt"] for r in rows] == prompts  # verbatim
    names = [os.path.basename(r["path"]) for r in rows]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and "\n" not in name and not name.startswith(".")
        assert len(name.encode()) < 255
        assert (tmp_path / "run" / "videos" / name).is_file()
    assert names[0] == 'a "quoted" cat_dog~' + names[0].split("~")[1]
    assert names[5] == "café au lait-0.mp4"  # a valid name stays exactly the prompt (VBench's naming)
    # the file source reads the same prompts (newline folded), skipping blank lines
    from stas.prompts import load_prompts
    assert len(load_prompts(compose(["prompts=file", f"prompts.path={prompt_file}"]).prompts)) == 6


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_prompt_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    cfg = compose(["prompts=file", f"prompts.path={path}", "logger=none"])
    with pytest.raises(ConfigError, match=r"prompts \(file\) is empty in .*empty.txt"):
        run(cfg, tmp_path / "run")


def test_missing_prompt_file_is_refused(tmp_path):
    cfg = compose(["prompts=file", f"prompts.path={tmp_path / 'nope.txt'}", "logger=none"])
    with pytest.raises(ConfigError, match="no such file"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "run_identity.yaml").exists()


@pytest.mark.slow
def test_wandb_offline_run_directory_is_written(tmp_path):
    cfg = compose(["logger=wandb", "progress=false", "model.steps=2", ONE_PROMPT, "name=wandb_check", "eval=none"])
    run(cfg, tmp_path)
    (offline,) = list((tmp_path / "wandb").glob("offline-run-*"))
    assert list(offline.glob("run-*.wandb"))
    # the run is closed (finish() ran): a second run in the same process starts a new offline run
    run(compose(["logger=wandb", "progress=false", "model.steps=2", ONE_PROMPT, "name=wandb_check", "seed=1",
                 "eval=none"]),
        tmp_path / "second")
    assert len(list((tmp_path / "second" / "wandb").glob("offline-run-*"))) == 1


def test_real_model_not_cached_gives_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = compose(["model=wan21_1.3b", "model.device=cpu"])
    with pytest.raises(BackboneError) as err:
        load_pipeline(cfg.model, backbone_from_config(cfg.model))
    message = str(err.value)
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in message
    assert str(tmp_path / "hf") in message
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in message


@pytest.mark.slow
def test_default_run_needs_no_arguments(cli, tmp_path):
    """The README's first command: the embedded default, CPU, no network."""
    result = cli("stas.run", f"hydra.run.dir={tmp_path / 'run'}", "progress=false", cwd=tmp_path,
                 env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    rows = rows_of(tmp_path / "run")
    assert len(rows) == 4 and all((tmp_path / "run" / r["path"]).is_file() for r in rows)
    assert "4 video(s) generated" in result.stdout
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("model,overrides,nfe", [
    ("tiny_wan21", [], 2 * 3),  # CFG: cond and uncond, 3 steps (two calls a step)
    ("tiny_cogvideox", [], 2 * 3),  # one batched [uncond, cond] call a step still evaluates two branches
    ("tiny_wan21", ["model.guidance_scale=1.0"], 3),  # no CFG: the cond branch only
    ("tiny_hunyuanvideo", ["model.guidance_scale=6.0"], 3),  # distilled guidance: embedded, one call a step
    ("tiny_hunyuanvideo", ["model.true_cfg_scale=4.0"], 2 * 3),  # true CFG: cond, then uncond
])
def test_rows_record_the_network_function_evaluations(tmp_path, model, overrides, nfe):
    gen(tmp_path / "run", f"model={model}", "prompts.prompts=[a cat]", "steer=none", *overrides)
    assert rows_of(tmp_path / "run")[0]["nfe"] == nfe
