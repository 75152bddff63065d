"""MA analysis (stas.ma.capture, stas.ma.stats, stas.ma.plots, stas.ma.compare, stas.analyze) on the real tiny pipelines
with planted massive activations: it must find exactly the planted channels, hierarchy and period."""

from __future__ import annotations

import importlib.util
import json
import re

import matplotlib.image
import pytest
import torch
import yaml

from stas.backbones import get_backbone, load_pipeline
from stas.ma.capture import LayerCapture, MACapture, capture_bytes
from stas.config import ConfigError, validate
from stas.core.selection import analysis_selection
from stas.errors import UserError
from stas.generation import generate
from stas.core.layout import TokenLayout
from stas.ma.analysis import DIMS_FILE, STATS_FILE, SUMMARY_FILE, analyze
from stas.ma.compare import compare
from stas.ma.hierarchy import sequence_period
from stas.ma.stats import SUMMARY_KEYS, VARIANT_KEYS, classify_channels, summarise
from stas.core.massive import Detection, load_calibration
from stas.backbones.tiny import planted_profile
from stas.loggers import RunLogger

from conftest import REPO, compose

PLANTED = [5, 17, 26]  # the tiny twins' default plant (conf schema PlantConfig)
OTHER_PLANT = ["model.tiny.plant.channels=[3,11,29]", "model.tiny.plant.magnitudes=[300,-250,200]",
               "model.tiny.plant.layers=[1]"]


def analysis_cfg(name, *overrides):
    return compose([f"model={name}", "logger=none", "progress=false", "prompts.limit=2", "model.steps=4",
                    *overrides], config_name="analyze")


def run_analysis(tmp_path, cfg, pipe=None):
    backbone = validate(cfg)
    if pipe is None:
        pipe = load_pipeline(cfg.model, backbone)
        pipe.set_progress_bar_config(disable=True)
    with RunLogger(cfg, tmp_path, job_type="analyze") as logger:
        return analyze(cfg, tmp_path, backbone, logger, pipe=pipe)


@pytest.fixture(scope="module")
def wan_run(tiny_pipelines, tmp_path_factory):
    """tiny_wan21 with its default plant, three prompts (the hierarchy verdict's minimum), four steps, every plot."""
    run_dir = tmp_path_factory.mktemp("wan_analysis")
    cfg = analysis_cfg("tiny_wan21", "prompts.limit=3")
    return cfg, run_analysis(run_dir, cfg, tiny_pipelines["tiny_wan21"][2])


@pytest.fixture(scope="module")
def replanted_run(tmp_path_factory):
    """tiny_cogvideox (batched CFG) with other channels planted in block 1 only."""
    run_dir = tmp_path_factory.mktemp("cog_analysis")
    cfg = analysis_cfg("tiny_cogvideox", *OTHER_PLANT, "analysis.plots=[]")
    return cfg, run_analysis(run_dir, cfg)


def test_finds_the_planted_channels_hierarchy_and_period(wan_run):
    cfg, result = wan_run
    summary = result.summary
    assert summary["variants"] == ["vanilla"] and summary["branches"] == ["cond", "uncond"]
    vanilla = summary["results"]["vanilla"]
    plant = cfg.model.tiny.plant
    for layer in ("0", "1"):
        entry = vanilla["layers"][layer]
        assert entry["massive"] == sorted(plant.channels)
        assert [c["channel"] for c in entry["channels"][:3]] == PLANTED  # ordered by peak: |100| > |-80| > |60|
        # each above the threshold in every observation, by a margin in the planted order; the rest below
        margins = [c["margin_min"] for c in entry["channels"]]
        assert all(c["frequency"] == 1.0 for c in entry["channels"][:3]) and margins[0] > margins[1] > margins[2] > 1
        assert all(c["frequency"] == 0.0 and c["margin"] < 1 for c in entry["channels"][3:])
        assert len(entry["weak"]) == cfg.analysis.weak and len(entry["non_ma"]) == cfg.analysis.non_ma
        assert not set(entry["weak"]) & set(entry["massive"]) and not set(entry["non_ma"]) & set(entry["massive"])
    hierarchy = vanilla["hierarchy"]
    assert hierarchy["verdict"] == "holds" and summary["hierarchy"]["verdict"] == "holds"
    assert all(hierarchy["by_step"][str(step)]["verdict"] == "holds" for step in range(cfg.model.steps))
    # the planted profile fixes the ratios; the random residual stream moves them a little
    ratios = hierarchy["ratios"]
    assert ratios["first_over_boundary"]["ratio"] == pytest.approx(plant.first_frame / plant.boundary, rel=0.1)
    assert ratios["first_over_interior"]["ratio"] == pytest.approx(plant.first_frame / plant.interior, rel=0.1)
    assert ratios["boundary_over_interior"]["ratio"] == pytest.approx(plant.boundary / plant.interior, rel=0.1)
    layout = TokenLayout.for_video(get_backbone("tiny_wan21"), cfg.model.height, cfg.model.width, cfg.model.num_frames)
    assert [(p["layer"], p["step"]) for p in vanilla["profiles"]] == [(1, 0)]  # defaults: middle block; 10% of 4 = 0
    for profile in vanilla["profiles"]:
        assert profile["period"] == layout.tokens_per_frame and profile["period_is_frame"]
        assert profile["period_evidence"] and profile["null_p"] < 0.01
        within = torch.tensor(profile["profile"])
        boundary = layout.mask("boundary", plant.boundary_width, plant.boundary_unit).reshape(layout.frames, -1)[1]
        assert within[boundary].min() > 3 * within[~boundary].max()
    assert vanilla["stability"] == {"prompts": 1.0, "steps": 1.0, "layers": 1.0, "channels_in_every_layer": PLANTED}


@pytest.mark.parametrize("name", ["tiny_wan21", "tiny_wan22", "tiny_cogvideox", "tiny_cogvideox15", "tiny_ltx"])
def test_every_twin_shows_exactly_the_planted_channels_in_every_observation(tiny_pipelines, tmp_path, name):
    """The plant is sized relative to the hidden state, so the default rule finds it in every block, step and
    branch of every family (a plant of fixed size stopped qualifying as the random state grew over the steps), and
    the planted hierarchy holds."""
    cfg = analysis_cfg(name, "prompts.limit=3", "model.steps=6", "analysis.plots=[]")  # 3: the verdict's minimum
    result = run_analysis(tmp_path, cfg, tiny_pipelines[name][2])
    vanilla = torch.load(tmp_path / STATS_FILE)["variants"]["vanilla"]
    channels, massive = vanilla["top_channels"], vanilla["top_massive"]  # (N, L, T, B, max_dims)
    found = channels.masked_fill(~massive, -1).sort(dim=-1).values[..., -3:]  # at most 3 may qualify
    assert massive.sum(dim=-1).eq(3).all()
    assert found.eq(torch.tensor(PLANTED, dtype=found.dtype)).all()
    summary = result.summary
    assert summary["detection"]["rule"] == "mean_abs" and summary["hierarchy"]["verdict"] == "holds"
    assert all(entry["massive"] == PLANTED for entry in summary["results"]["vanilla"]["layers"].values())


def test_detection_follows_the_plant_not_hard_coded_channels(replanted_run):
    cfg, result = replanted_run
    vanilla = result.summary["results"]["vanilla"]
    assert vanilla["layers"]["0"]["massive"] == []  # nothing planted in block 0: random weights have no MAs
    assert vanilla["layers"]["1"]["massive"] == [3, 11, 29]
    entries = [vanilla["regions"]["1"][str(step)] for step in range(cfg.model.steps)]
    assert all(e["first_over_boundary"] > 1.5 and e["boundary_over_interior"] > 1.5 for e in entries if e["with_ma"])
    assert vanilla["profiles"][0]["period_is_frame"]
    assert vanilla["stability"]["channels_in_every_layer"] == []
    dims = yaml.safe_load((result.run_dir / DIMS_FILE).read_text())
    assert dims["model"] == cfg.model.name
    assert dims["layers"][1]["massive"] == [3, 11, 29] and dims["layers"][0]["massive"] == []


def test_without_cfg_only_the_cond_branch_is_captured(tiny_pipelines, tmp_path):
    cfg = analysis_cfg("tiny_wan22", "model.guidance_scale=1.0", "prompts.limit=1", "analysis.plots=[]")
    result = run_analysis(tmp_path, cfg, tiny_pipelines["tiny_wan22"][2])
    assert result.summary["branches"] == ["cond"]
    assert result.summary["results"]["vanilla"]["layers"]["1"]["massive"] == PLANTED
    stats = torch.load(tmp_path / STATS_FILE)
    assert stats["variants"]["vanilla"]["peaks_max"].shape == (2, 4, 1, 128)


def test_outputs_are_complete_and_recomputable(wan_run):
    cfg, result = wan_run
    run_dir = result.run_dir
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert tuple(summary) == SUMMARY_KEYS
    assert tuple(summary["results"]["vanilla"]) == VARIANT_KEYS
    region = summary["results"]["vanilla"]["regions"]["1"]["2"]
    assert set(region) == {"first_frame", "boundary", "interior", "first_over_boundary", "boundary_over_interior",
                           "first_over_interior", "observations", "with_ma"}
    assert region["observations"] == region["with_ma"] == 3 * 2  # prompts x branches
    assert summary["hierarchy"] == {"variant": "vanilla", **{key: value for key, value in
                                                             summary["results"]["vanilla"]["hierarchy"].items()
                                                             if key != "by_step"}}
    stats = torch.load(run_dir / STATS_FILE)
    meta, tensors = stats["meta"], stats["variants"]["vanilla"]
    assert tensors["peaks_max"].shape == (2, 4, 2, cfg.model.hidden_dim)
    assert tensors["regions"].shape == (3, 2, 4, 2, 3, 2)  # prompts, layers, steps, branches, regions, mean|max
    assert tensors["tokens_mean"].shape == (len(meta["profile"]), 2, 120)
    assert summarise(stats, cfg.analysis.min_frequency, cfg.analysis.weak, cfg.analysis.non_ma) == summary
    names = sorted(p.name for p in result.plots)
    assert names == ["ma_channels_L1.png", "ma_profile.png", "ma_ratios.png", "ma_tokens_L1_s0.png"]
    for path in result.plots:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # something is drawn
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_calibration_round_trips_into_calibrated_steering(replanted_run, tmp_path):
    _, result = replanted_run
    path = result.run_dir / DIMS_FILE
    dims = yaml.safe_load(path.read_text())
    for kind, key in (("calibrated", "massive"), ("calibrated_weak", "weak"), ("calibrated_non_ma", "non_ma")):
        expected = {layer: entry[key] for layer, entry in dims["layers"].items()}
        assert load_calibration(path, kind, get_backbone("tiny_cogvideox")) == expected
    cfg = compose(["model=tiny_cogvideox", "logger=none", "progress=false", "prompts.limit=1", "model.steps=2",
                   "steer=stas", "steer.dims=calibrated", f"steer.calibration={path}"])
    backbone = validate(cfg)
    with RunLogger(cfg, tmp_path, job_type="generate") as logger:
        summary = generate(cfg, tmp_path, backbone, logger)
    assert summary.steering["channels"] == {0: [], 1: [3, 11, 29]}
    assert summary.steering["layers"] == [1]  # block 0 has no calibrated channel: no hook, nothing steered


def test_steered_variant_is_reported_next_to_vanilla(tiny_pipelines, tmp_path):
    cfg = analysis_cfg("tiny_wan21", "steer=stas", "prompts.limit=1", "analysis.plots=[profile]")
    result = run_analysis(tmp_path, cfg, tiny_pipelines["tiny_wan21"][2])
    assert result.summary["variants"] == ["vanilla", "steered"] and result.summary["steer"] == "stas"
    vanilla, steered = (result.summary["results"][name]["regions"]["0"]["0"] for name in ("vanilla", "steered"))
    # STAS (max_scaled, alpha 1) lifts first-frame and boundary MAs to the block's largest MA magnitude; the capture
    # hook runs after the steering hook, so it sees that
    assert vanilla["first_frame"]["mean"] > 1.5 * vanilla["boundary"]["mean"]
    assert steered["boundary"]["mean"] == pytest.approx(steered["first_frame"]["mean"], rel=1e-4)
    assert steered["interior"]["mean"] == pytest.approx(vanilla["interior"]["mean"], rel=1e-4)
    assert [p.name for p in result.plots] == ["ma_profile.png"]
    dims = yaml.safe_load((tmp_path / DIMS_FILE).read_text())
    assert dims["layers"][0]["massive"] == PLANTED  # calibration comes from the vanilla variant


def test_capture_hook_never_synchronises(tiny_pipelines):
    """The hook on meta tensors: any host read of a value (.item(), bool(), .tolist()) would raise."""
    cfg = analysis_cfg("tiny_cogvideox")
    _, backbone, _ = tiny_pipelines["tiny_cogvideox"]
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    selection = analysis_selection(cfg.analysis, backbone.num_layers, cfg.model.steps)
    capture = MACapture(backbone, selection, Detection(), 1, "rows")
    capture.begin(layout, num_steps=cfg.model.steps, do_cfg=True)
    hidden = torch.empty(2, layout.num_tokens, backbone.hidden_dim, device="meta")  # batched [uncond, cond]
    capture.tracker.on_transformer_call(None, (), {"hidden_states": hidden})  # the call's batch and device
    text = torch.empty(2, 7, backbone.hidden_dim, device="meta")
    assert LayerCapture(capture, 1)(None, (), (hidden, text)) is None
    assert capture.buffers["peaks"].device.type == "meta"
    assert capture.buffer_bytes() == capture.bound_bytes()


def test_memory_is_bounded_on_many_steps(tiny_pipelines, tmp_path):
    steps = 48
    cfg = analysis_cfg("tiny_wan21", f"model.steps={steps}", "model.guidance_scale=1.0", "model.height=48",
                       "model.num_frames=9", "prompts.limit=1", "analysis.plots=[]")
    result = run_analysis(tmp_path, cfg, tiny_pipelines["tiny_wan21"][2])
    layout = TokenLayout.for_video(get_backbone("tiny_wan21"), 48, cfg.model.width, 9)
    profile_pairs = len(result.summary["results"]["vanilla"]["profiles"])
    dim = cfg.model.hidden_dim
    bound = capture_bytes(layers=2, steps=steps, branches=1, hidden_dim=dim, profile_pairs=profile_pairs,
                          tokens=layout.num_tokens)
    # per observation: D peaks, 1 threshold, 3 regions x (mean, max)
    assert result.capture_bytes == bound == 4 * (2 * steps * (dim + 1 + 6) + profile_pairs * layout.num_tokens)
    # far below keeping the block outputs (2 blocks x 48 steps x S x D floats)
    assert bound < 2 * steps * layout.num_tokens * dim * 4 / 10


@pytest.mark.parametrize("grid,width,unit", [((5, 4, 6), 1, "rows"), ((7, 5, 9), 2, "tokens"), ((4, 6, 8), 2, "rows")])
def test_period_equals_tokens_per_frame_for_chunked_spikes(grid, width, unit):
    layout = TokenLayout(*grid)
    plant = compose(["model=tiny_wan21", f"model.tiny.plant.boundary_width={width}",
                     f"model.tiny.plant.boundary_unit={unit}"]).model.tiny.plant
    tokens = planted_profile(layout, plant) + 0.01 * torch.rand(layout.num_tokens, generator=torch.Generator().manual_seed(0))
    result = sequence_period(tokens, layout)
    assert result["period"] == layout.tokens_per_frame and result["period_is_frame"] and result["period_evidence"]
    assert sequence_period(torch.ones(layout.num_tokens), layout)["period"] is None  # nothing varies
    assert sequence_period(tokens[: 2 * layout.tokens_per_frame], TokenLayout(2, *grid[1:]))["period"] is None


def test_channel_classes():
    peaks = torch.tensor([1.0, 50.0, 2.0, 3.0, 40.0, 1.5, 2.5, 1.2])
    frequency = torch.tensor([0.0, 1.0, 0.0, 0.2, 0.4, 0.0, 0.0, 0.0])
    classes = classify_channels(peaks, frequency, min_frequency=0.5, weak=2, non_ma=2)
    assert classes == {"massive": [1], "weak": [3, 4], "non_ma": [2, 5]}  # median peak 2.0; 5 and 6 tie, 5 first


@pytest.mark.parametrize("override,message", [
    ("analysis.layers=[5]", "analysis.layers contains 5; the model has blocks 0..1"),
    ("analysis.layers=[]", "analysis.layers=[] selects nothing"),
    ("analysis.steps='9:'", "analysis.steps='9:' selects no step of 4"),
    ("analysis.profile_steps=[3]", "analysis.profile_steps contains [3], which analysis.steps does not capture"),
    ("analysis.plots=[tokens,heat]", "analysis.plots entry='heat' is not allowed; allowed: tokens, ratios"),
    ("analysis.min_frequency=0", "analysis.min_frequency=0.0 must lie in (0, 1]"),
    ("analysis.min_effect=-0.1", "analysis.min_effect=-0.1 must be a finite number in [0, 10]"),
    ("analysis.resamples=10", "analysis.resamples=10 must be an integer in [100, 1000000]"),
    ("analysis.min_prompts=1", "analysis.min_prompts=1 must be an integer in [2, 100000]"),
    ("analysis.confidence=1.0", "analysis.confidence=1.0 must lie in [0.5, 1)"),
])
def test_bad_selections_are_clear_config_errors(override, message):
    extra = ["analysis.steps=[0,1]"] if "profile_steps" in override else []
    with pytest.raises(ConfigError) as err:
        validate(analysis_cfg("tiny_wan21", override, *extra))
    assert message in str(err.value)


def test_analyze_config_defaults_to_vanilla():
    assert not compose([], config_name="analyze").steer.enabled
    assert compose(["steer=stas"], config_name="analyze").steer.enabled


def test_compare_puts_runs_side_by_side(wan_run, replanted_run, tmp_path, capsys):
    runs = [wan_run[1].run_dir, replanted_run[1].run_dir]
    table = compare(runs, tmp_path)
    lines = table.splitlines()
    assert len(lines) == 4 and "tiny_wan21" in lines[2] and "tiny_cogvideox" in lines[3]
    cells = [cell.strip() for cell in lines[2].split("|")]
    assert "5 17 26" in cells and cells.count("24") == 2  # tokens per frame and the period
    assert (tmp_path / "compare.md").read_text().strip() == table
    assert "holds" in cells and "[2.00, 2.00]" in cells  # the verdict and the first/boundary interval
    row = json.loads((tmp_path / "compare.json").read_text())[0]
    assert row["period = frame"] is True and row["period evidence"] is True and row["hierarchy"] == "holds"
    assert matplotlib.image.imread(tmp_path / "compare.png").shape[0] > 100
    # a sweep directory stands for the runs inside it
    assert compare([runs[0].parent], tmp_path / "sweep").count("tiny_") >= 1
    script = _load_script(REPO / "analysis" / "compare_runs.py")
    assert script.main([str(runs[0]), "--out", str(tmp_path / "script")]) == 0
    assert script.main([str(tmp_path / "compare.md")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_compare_rejects_directories_that_are_not_analysis_runs(tmp_path):
    (tmp_path / "videos").mkdir()
    with pytest.raises(UserError, match="is not an analysis run: it has no ma_summary.json"):
        compare([tmp_path / "videos"], tmp_path)
    with pytest.raises(UserError, match="analysis.compare is empty"):
        compare([], tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / SUMMARY_FILE).write_text('{"model": "x"}')
    with pytest.raises(UserError, match="missing: family"):
        compare([tmp_path / "broken"], tmp_path)


@pytest.mark.slow
def test_cli_analyze_logs_offline_and_compare_fails_cleanly(cli, tmp_path):
    run_dir = tmp_path / "analysis"
    done = cli("stas.analyze", "prompts.limit=1", "model.steps=2", "progress=false", "logger.mode=offline",
               f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stas.analyze: tiny_wan21 / steer=none" in done.stdout
    for name in (SUMMARY_FILE, DIMS_FILE, STATS_FILE, "ma_ratios.png", "ma_profile.png"):
        assert (run_dir / name).stat().st_size > 0
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert b"analyze" in next(wandb_run.glob("run-*.wandb")).read_bytes()  # the job type
    assert len(list(wandb_run.glob("files/media/images/analysis/*.png"))) == 4  # the plots
    bad = cli("stas.analyze", f"analysis.compare=[{run_dir},{run_dir / '.hydra'}]", f"hydra.run.dir={tmp_path / 'cmp'}",
              cwd=tmp_path)
    assert bad.returncode == 2
    assert re.fullmatch(r"stas\.analyze: error: analysis\.compare: '.*' is not an analysis run: .*\n", bad.stderr)


def _load_script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stats_from_before_the_detect_group_are_summarised(wan_run):
    """An ma_stats.pt written before the `detect` group (channel-peak rule: `medians`, meta ratio and max_dims) is
    read as that rule: its thresholds are ratio x medians."""
    cfg, result = wan_run
    stats = torch.load(result.run_dir / STATS_FILE)
    legacy_meta = {k: v for k, v in stats["meta"].items() if k != "detection"}
    legacy = {"meta": {**legacy_meta, "ratio": 10.0, "max_dims": 8},
              "variants": {name: {**{k: v for k, v in tensors.items() if k not in ("thresholds", "margin")},
                                  "medians": tensors["thresholds"] / 10.0, "peak_ratio": tensors["margin"]}
                           for name, tensors in stats["variants"].items()}}
    old = summarise(legacy, cfg.analysis.min_frequency, cfg.analysis.weak, cfg.analysis.non_ma)
    new = summarise(stats, cfg.analysis.min_frequency, cfg.analysis.weak, cfg.analysis.non_ma)
    assert old["detection"] == {"rule": "channel_peak", "ratio": 10.0, "floor": 0.0, "max_dims": 8,
                                "min_frequency": cfg.analysis.min_frequency}
    assert old["results"] == new["results"]  # the same thresholds, so the same channels, margins and verdicts
