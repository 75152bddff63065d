"""VBench's color through stas: a video where the object is never detected gets a row saying so (not an error, not
scored again), a set with no detection at all does not crash, and the rows of a run scored in parts pool to VBench's
own value on the complete set.

detectron2 is not installed here, so GRiT (VBench's detector) cannot be built: a `sitecustomize` in the worker's
PYTHONPATH puts a stand-in `vbench.third_party.grit_model.DenseCaptioning` in place whose detections follow the
frames' brightness. Everything else is VBench's real code: VBench.evaluate, init_submodules (the cache's GRiT file),
compute_color, color, check_generate, load_video."""

import importlib
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from stas.evaluation import evaluate_run
from stas.evaluation.records import AGGREGATE_FILE
from stas.evaluation.runner import run_videos
from stas.evaluation.vbench import VBenchRunner
from stas.evaluation.vbench_worker import PACKAGES, guard_no_detection
from stas.rundir import read_jsonl
from stas.video import write_mp4

from evaluation_helpers import make_run

FAKE_GRIT = '''
import os, sys, types
import numpy as np


class DenseCaptioning:  # stands in for vbench.third_party.grit_model.DenseCaptioning (needs detectron2)
    def __init__(self, device):
        self.device = device

    def initialize_model(self, model_weight):
        assert os.path.isfile(model_weight), model_weight  # the cache's GRiT file, as init_submodules names it

    def run_caption_tensor(self, frame):  # ([(caption, box, [object name])], visualisation), as GRiT's
        level = float(np.asarray(frame).mean())
        if level > 180:
            return [("red bicycle", [0, 0, 8, 8], ["bicycle"])], None
        if level > 80:
            return [("green bicycle", [0, 0, 8, 8], ["bicycle"])], None
        return [], None


module = types.ModuleType("vbench.third_party.grit_model")
module.DenseCaptioning = DenseCaptioning
sys.modules[module.__name__] = module
'''


def color_frames(seed: int, frames: int = 17):
    """seed 0: dark throughout (nothing detected); seed 1: bright (a red bicycle), then grey (a green one)."""
    levels = [20] * frames if seed == 0 else [230] * 9 + [130] * (frames - 9)
    return np.stack([np.full((64, 96, 3), level, np.uint8) for level in levels])


@pytest.fixture
def color_run(tmp_path, monkeypatch):
    site = tmp_path / "site"
    # What the probe looks for and this Python lacks (detectron2, lvis, ...): the stand-in never imports them
    for package in (name for name in PACKAGES["color"] if importlib.util.find_spec(name) is None):
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text("")
    (site / "sitecustomize.py").write_text(FAKE_GRIT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    cache = tmp_path / "cache"
    (cache / "grit_model").mkdir(parents=True)
    (cache / "grit_model" / "grit_b_densecap_objectdet.pth").write_bytes(b"")
    return make_run(tmp_path, ["prompts=vbench", "prompts.vbench_dimensions=[color]", "prompts.limit=1",
                               "prompts.samples_per_prompt=2", "eval.evaluators=[vbench]",
                               "eval.vbench.mode=vbench_standard", "eval.vbench.dimensions=[color]",
                               f"eval.vbench.cache_dir={cache}"], frames=color_frames)


@pytest.mark.slow
def test_color_records_videos_without_detection_and_pools_to_the_complete_set(color_run, tmp_path):
    cfg, run_dir = color_run
    dark, seen = "a red bicycle-0.mp4", "a red bicycle-1.mp4"
    # The dark video alone (shard 1 of 2): no video of the set has the object, VBench's color divides by zero
    summary = evaluate_run(cfg, run_dir, shard=(0, 2))
    assert not summary.skipped and not summary.errors, summary
    assert summary.excluded == {"vbench/color": 1} and not summary.scored
    row, = read_jsonl(run_dir / "shards" / "metrics-000-of-002.jsonl")
    assert row["video"] == dark and row["value"] is None and "error" not in row
    assert row["excluded"].startswith("VBench's color gives this video no value: GRiT detected the prompt's object")
    assert "no value by the tool's own definition" in str(summary)
    # The other video (shard 2 of 2)
    summary = evaluate_run(cfg, run_dir, shard=(1, 2))
    assert summary.scored == {"vbench/color": 1} and not summary.excluded
    # Unsharded: both count as done, the dark one is not handed to VBench again
    summary = evaluate_run(cfg, run_dir)
    assert summary.cached == {"vbench/color": 2} and not summary.scored and not summary.excluded
    aggregate = json.loads((run_dir / AGGREGATE_FILE).read_text())
    assert aggregate["errors"] == []
    assert aggregate["excluded"] == [{"video": dark, "evaluator": "vbench", "metric": "color",
                                      "excluded": row["excluded"]}]
    assert aggregate["metrics"]["vbench/color"]["count"] == 1
    # VBench's own value on the complete set, all videos in one call, equals the pooled rows of the parts
    runner = VBenchRunner(cfg.eval.vbench, "cpu", tmp_path / "logs")
    runner.probe(["color"])
    answer = runner.evaluate("color", run_videos(run_dir, 0, 1)[0], "complete")
    assert [result["video"] for result in answer["videos"]] == [seen]
    assert 0.0 < answer["value"] < 1.0
    assert aggregate["vbench"]["dimensions"]["color"] == pytest.approx(answer["value"], abs=1e-12)
    row, = read_jsonl(run_dir / "shards" / "metrics-001-of-002.jsonl")
    assert row["video"] == seen and row["value"] == pytest.approx(answer["videos"][0]["value"], abs=1e-12)


def test_the_guard_turns_only_colors_own_division_by_zero_into_no_result(tmp_path, monkeypatch):
    namespace = {}
    exec(FAKE_GRIT.replace("sys.modules[module.__name__] = module", ""), namespace)
    stand_in = types.ModuleType("vbench.third_party.grit_model")
    stand_in.DenseCaptioning = namespace["DenseCaptioning"]
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    monkeypatch.delitem(sys.modules, "vbench.color", raising=False)
    color_module = importlib.import_module("vbench.color")  # VBench's real color.py
    monkeypatch.setattr(color_module, "color", color_module.color)  # restored afterwards
    video = tmp_path / "a red bicycle-0.mp4"
    write_mp4(color_frames(0), video, 8, tmp_path / ".partial")
    videos = [{"prompt": "a red bicycle", "video_list": [str(video)], "auxiliary_info": {"color": "red"}}]
    with pytest.raises(ZeroDivisionError):
        color_module.color(stand_in.DenseCaptioning("cpu"), videos, "cpu")  # VBench as it is
    guard_no_detection("color")
    assert color_module.color(stand_in.DenseCaptioning("cpu"), videos, "cpu") == (None, [])

    class Broken(stand_in.DenseCaptioning):
        def run_caption_tensor(self, frame):
            return 1 / 0  # a division by zero inside the model is a real error

    with pytest.raises(ZeroDivisionError):
        color_module.color(Broken("cpu"), videos, "cpu")
