"""The evaluator interface and registry: the registry lists exactly the evaluators of stas/evaluation/evaluators/; an
evaluator registered from another module (toys here) runs through stas.evaluate's real path, video-level or
set-level, with the shared resume, error rows and summary; unknown names and bad evaluator classes are refused."""

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import stas.evaluation.evaluators as evaluators_package
from stas.config import ConfigError, validate
from stas.evaluate import main as evaluate_main
from stas.evaluation import EvaluatorUnavailable, Evaluator, Scorer, evaluate_run, evaluator_names, register
from stas.evaluation.base import REGISTRY
from stas.evaluation.records import AGGREGATE_FILE, METRICS_FILE
from stas.evaluation.schema import EvalConfig, build_eval_config, validate_eval
from stas.rundir import read_jsonl

from conftest import compose
from evaluation_helpers import make_run


class FrameCount(Evaluator):
    """A toy video-level evaluator: how many frames, and their mean brightness (pooled over frames)."""

    name = "frame_count"
    done_metric = "frames"
    calls = 0

    def score_video(self, scorer, video, frames):
        type(self).calls += 1
        return {"frames": (float(len(frames)), None), "brightness": (float(np.mean(frames) / 255), len(frames))}


class SetRank(Evaluator):
    """A toy set-level evaluator: each video's rank by file size among the videos scored together; it 'loses' the
    video named in `lose`, and fails as a whole when `fail` is set."""

    name = "set_rank"
    batched = True
    lose = None
    fail = False

    def scorers(self, videos):
        return [Scorer(self.name, done_metric="rank", part="rank")]

    def score_videos(self, scorer, videos):
        if self.fail:
            raise EvaluatorUnavailable("the toy tool is not installed here")
        ranked = sorted(videos, key=lambda video: video.path.stat().st_size)
        return {video.name: {"rank": (float(ranked.index(video)), 1)} for video in videos if video.name != self.lose}


@pytest.fixture
def toys():
    """FrameCount and SetRank registered for one test, as a module of stas/evaluation/evaluators/ registers its own."""
    for toy in (FrameCount, SetRank):
        register(toy)
    FrameCount.calls, SetRank.lose, SetRank.fail = 0, None, False
    yield
    for toy in (FrameCount, SetRank):
        REGISTRY.pop(toy.name)


def test_the_registry_lists_exactly_the_evaluators_of_the_evaluators_package():
    assert evaluator_names() == ("pixel", "dino", "clip", "vbench")
    # Every module of the folder is imported (nothing else names them), and registers what it defines
    folder = Path(evaluators_package.__file__).parent
    modules = {f"{evaluators_package.__name__}.{path.stem}" for path in folder.glob("*.py") if path.stem != "__init__"}
    assert set(evaluators_package.MODULES) == modules and modules <= set(sys.modules)
    assert {cls.__module__ for cls in REGISTRY.values()} == modules
    # The eval node: the shared options, then each evaluator's node, as conf/eval/*.yaml and users' overrides know it
    assert [f.name for f in dataclasses.fields(EvalConfig)] == [
        "evaluators", "device", "batch_size", "temporal_compression", "pixel", "dino", "clip", "vbench"]


def test_a_video_level_evaluator_from_another_module_runs_through_stas_evaluate(toys, tmp_path, capsys):
    _, run_dir = make_run(tmp_path)
    evaluate_main([str(run_dir), "eval.evaluators=[pixel,frame_count]", "logger=none", "progress=false"])
    out = capsys.readouterr().out
    assert "scored now: pixel 2, frame_count 2" in out
    assert "frame_count/brightness" in out and "frame_count/frames" in out
    rows = {(row["video"], row["evaluator"], row["metric"]): row for row in read_jsonl(run_dir / METRICS_FILE)}
    videos = sorted(path.name for path in (run_dir / "videos").glob("*.mp4"))
    for video in videos:
        frames = rows[(video, "frame_count", "frames")]
        assert frames["value"] == 17.0 and "weight" not in frames and "settings" not in frames
        assert frames["video_sha256"] and frames["prompt"] in video
        assert 0 < rows[(video, "frame_count", "brightness")]["value"] < 1
        assert rows[(video, "frame_count", "brightness")]["weight"] == 17
    aggregate = json.loads((run_dir / AGGREGATE_FILE).read_text())
    assert aggregate["metrics"]["frame_count/frames"] == {"mean": 17.0, "std": 0.0, "count": 2}
    assert "pooled" in aggregate["metrics"]["frame_count/brightness"]
    assert aggregate["eval"]["evaluators"] == ["pixel", "frame_count"]
    # Resume is the runner's, the same for every evaluator: nothing is scored twice
    evaluate_main([str(run_dir), "eval.evaluators=[frame_count]", "logger=none", "progress=false"])
    assert "already scored (cached): frame_count 2" in capsys.readouterr().out
    assert FrameCount.calls == 2


def test_a_set_level_evaluator_gets_the_videos_that_decode_at_once(toys, tmp_path):
    cfg, run_dir = make_run(tmp_path, ["prompts.limit=3", "eval.evaluators=[set_rank,frame_count]"])
    videos = sorted((run_dir / "videos").glob("*.mp4"))
    broken, lost = videos[0], videos[1]
    broken.write_bytes(b"not a video")
    SetRank.lose = lost.name
    summary = evaluate_run(cfg, run_dir)
    # Video-level first, then set-level; one error row per scorer for the video that does not decode
    assert summary.scored == {"frame_count": 2, "set_rank/rank": 1}
    assert summary.errors == {"frame_count": 1, "set_rank/rank": 2}
    rows = {(row["video"], row["evaluator"], row["metric"]): row for row in read_jsonl(run_dir / METRICS_FILE)}
    assert rows[(broken.name, "frame_count", "error")]["error"].startswith("cannot decode")
    assert rows[(broken.name, "set_rank", "rank")]["error"].startswith("cannot decode")
    lost_row = rows[(lost.name, "set_rank", "rank")]
    assert lost_row["value"] is None and lost_row["error"] == "set_rank returned no result for this video"
    assert lost_row["video_sha256"] == rows[(lost.name, "frame_count", "frames")]["video_sha256"]
    assert rows[(videos[2].name, "set_rank", "rank")]["value"] == 0.0
    # A set-level scorer that fails as a whole is skipped with its reason; the rows it wrote before stay
    SetRank.lose, SetRank.fail = None, True
    summary = evaluate_run(cfg, run_dir)
    assert summary.skipped == {"set_rank/rank": "the toy tool is not installed here"}
    assert summary.cached == {"frame_count": 2, "set_rank/rank": 1}
    assert "SKIPPED set_rank/rank: the toy tool is not installed here" in str(summary)


def test_unknown_evaluator_names_are_refused_naming_field_value_and_allowed_names(toys):
    with pytest.raises(ConfigError) as caught:
        validate(compose(["logger=none", "eval.evaluators=[pixel,fvd]"]))
    assert str(caught.value) == ("eval.evaluators='fvd' is not allowed; allowed: "
                                 "pixel, dino, clip, vbench, frame_count, set_rank")
    validate(compose(["logger=none", "eval.evaluators=[frame_count]"]))  # registered: allowed
    with pytest.raises(ConfigError, match=r"eval\.evaluators=\['pixel', 'pixel'\] names an evaluator twice"):
        validate(compose(["logger=none", "eval.evaluators=[pixel,pixel]"]))


def test_an_evaluators_config_node_is_built_bounded_and_checked_by_the_evaluator():
    @dataclass
    class ToyConfig:
        level: int = 3
        label: str = "ok"

    class Toy(FrameCount):
        name = "toy"
        config = ToyConfig
        bounds = {"level": (1, 9)}

        @classmethod
        def check_config(cls, options, evaluation):
            if options.label != "ok":
                raise ConfigError(f"eval.toy.label={options.label!r} is not allowed; allowed: ok")

    schema = build_eval_config((REGISTRY["pixel"], Toy))
    assert [f.name for f in dataclasses.fields(schema)][-2:] == ["pixel", "toy"]
    node = OmegaConf.structured(schema)
    assert node.toy.level == 3
    REGISTRY["toy"] = Toy
    try:
        node.toy.label = "bad"
        validate_eval(node)  # not selected: its own checks do not run, its ranges do
        node.evaluators = ["toy"]
        with pytest.raises(ConfigError, match=r"^eval\.toy\.label='bad' is not allowed; allowed: ok$"):
            validate_eval(node)
        node.toy.label, node.toy.level = "ok", 10
        with pytest.raises(ConfigError, match=r"^eval\.toy\.level=10 must be an integer in \[1, 9\]$"):
            validate_eval(node)
        # Registered too late for the schema (not from stas/evaluation/evaluators/): said plainly when selected
        late = compose(["logger=none"]).eval
        late.evaluators = ["toy"]
        with pytest.raises(ConfigError, match=r"^eval\.toy is missing: evaluator 'toy' .* has a config node"):
            validate_eval(late)
    finally:
        REGISTRY.pop("toy")


@pytest.mark.parametrize("attributes, message", [
    ({"name": "pixel"}, r"two evaluators are named 'pixel'"),
    ({"name": "device"}, r"name='device': an evaluator name is lower-case letters"),
    ({"name": "Bad-Name"}, r"name='Bad-Name': an evaluator name"),
    ({"name": "lazy", "score_video": Evaluator.score_video}, r"^Lazy \(batched = False\) must implement score_video$"),
    ({"name": "lazy", "batched": True}, r"^Lazy \(batched = True\) must implement score_videos$"),
])
def test_bad_evaluator_classes_are_refused_at_registration(attributes, message):
    cls = type("Lazy" if attributes["name"] == "lazy" else "Toy", (FrameCount,), attributes)
    with pytest.raises((ValueError, TypeError), match=message):
        register(cls)
    assert evaluator_names() == ("pixel", "dino", "clip", "vbench")
