"""The VBench integration suite: every dimension through `python -m stas.evaluate` on a tiny run, with VBench 0.1.5's
real code and random-init weights in the real file formats (vbench_random_weights.py), so that each dimension's whole
path runs: stas's probe and routing, the worker, VBench's loading of each file, its models, its scoring, stas's rows
and metrics.json. The values are meaningless; that each video gets a finite one is what is checked.

    python -m pytest -m vbench_full tests/evaluation/test_vbench_full.py

Interpreters: eval.vbench.python is $STAS_VBENCH_PYTHON (default: this one; it needs the `vbench` extra's packages,
e.g. a `venv --system-site-packages` with them added), and human_action and scene go to the separate environment
$STAS_VBENCH_ENV (default /tmp/vbenv/bin/python, made by `python -m stas.evaluation.vbench_env /tmp/vbenv`). A dimension
whose packages are missing or too new in the interpreter that would run it is skipped with the probe's message (which
says how to install them; GRiT's detectron2 is built from source), and so is one that needs what the suite cannot
build (`unbuildable`: DINO's code). The weights are built once per session in a temporary cache, bert-base-uncased
(Tag2Text's and GRiT's) in a Hugging Face hub cache inside it that every process of the test is pointed at. Each test
prints its seconds per video (the evaluate call, model loading included, divided by the videos). The last test scores
one run on all 16 dimensions at once (the docs' check of a whole setup) and checks Quality, Semantic and Total.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stas.evaluate import main as evaluate_main
from stas.evaluation.records import AGGREGATE_FILE, METRICS_FILE
from stas.evaluation.scores import NEED_STANDARD_PROMPTS
from stas.evaluation.vbench import VBenchRunner
from stas.evaluation.vbench_env import SEPARATE_DIMENSIONS
from stas.evaluation.vbench_worker import CACHE_FILES, LEFT_OUT
from stas.generation import VIDEOS_DIR
from stas.rundir import read_jsonl

from conftest import compose
from evaluation_helpers import make_run
from vbench_random_weights import BUILDERS, DINO_CLONE, hub_environment

WEIGHT_BUILDER = Path(__file__).with_name("vbench_random_weights.py")
BESIDE_PYTHON = os.environ.get("STAS_VBENCH_PYTHON") or sys.executable
SEPARATE_PYTHON = os.environ.get("STAS_VBENCH_ENV", "/tmp/vbenv/bin/python")
# Every VBench dimension, in issue 16's order: no weights, one model each beside stas, the separate environment, DINO,
# GRiT.
DIMENSIONS = ["temporal_flickering", "background_consistency", "aesthetic_quality", "appearance_style",
              "imaging_quality", "motion_smoothness", "dynamic_degree", "temporal_style", "overall_consistency",
              "human_action", "scene", "subject_consistency", "object_class", "multiple_objects", "color",
              "spatial_relationship"]


def unbuildable(dimension: str) -> str | None:
    """Why the suite cannot provide what `dimension` loads, or None."""
    without_builder = [relative for relative, _ in CACHE_FILES[dimension] if relative not in BUILDERS]
    if without_builder:
        return f"the suite has no random-weight builder for {', '.join(without_builder)}"
    if dimension == "subject_consistency":
        clone = os.environ.get(DINO_CLONE)
        if not clone or not (Path(clone) / "hubconf.py").is_file():
            return (f"VBench loads DINO with torch.hub from a clone of facebookresearch/dino in its cache; "
                    f"{DINO_CLONE} names none ({clone!r}) and there is no network to clone one: git clone "
                    f"https://github.com/facebookresearch/dino DIR, then {DINO_CLONE}=DIR")
    return None


@pytest.fixture(scope="session")
def weights_cache(tmp_path_factory) -> Path:
    """One VBench cache for the session: files several dimensions read (CLIP ViT-B/32, ViCLIP) are built once."""
    return tmp_path_factory.mktemp("vbench-cache")


def interpreters(dimensions) -> list[str]:
    """The eval.vbench.* overrides that choose where the dimensions run."""
    overrides = [f"eval.vbench.python={BESIDE_PYTHON}"]
    if set(dimensions) & set(SEPARATE_DIMENSIONS) and Path(SEPARATE_PYTHON).is_file():
        overrides.append(f"eval.vbench.separate_python={SEPARATE_PYTHON}")
    return overrides


def mode(dimension: str) -> str:
    return "vbench_standard" if dimension in NEED_STANDARD_PROMPTS else "custom_input"


def prompt_overrides(dimension: str) -> list[str]:
    """A run of one video: of VBench's own prompt for the dimensions it scores only on its prompts, else of stas's."""
    if mode(dimension) == "vbench_standard":
        return ["prompts=vbench", f"prompts.vbench_dimensions=[{dimension}]", "prompts.limit=1",
                "prompts.samples_per_prompt=1"]
    return ["prompts.limit=1"]


def problem(dimension: str, dimension_route) -> str | None:
    """Why the interpreter that would run the dimension cannot (packages missing or too new, with the probe's
    message and how to fix it), or None. Missing weight files are not a reason: the suite builds them."""
    # The first line lists the missing weight files (the suite builds them), then the package problems.
    summary = re.sub(r"^\d+ weight file\(s\) missing .*?eval\.vbench\.cache_dir\)(; )?", "",
                     (dimension_route.problems or "").split("\n")[0])
    if not summary:
        return None
    if dimension in SEPARATE_DIMENSIONS:
        hint = (f" (the separate environment: set STAS_VBENCH_ENV or make {SEPARATE_PYTHON} with python -m "
                f"stas.evaluation.vbench_env {Path(SEPARATE_PYTHON).parent.parent})")
    else:
        hint = " (eval.vbench.python: set STAS_VBENCH_PYTHON to a Python with the `vbench` extra's packages"
        if "detectron2" in summary:  # GRiT's, not on PyPI and not in the extra: built from a source copy
            hint += (", and detectron2 built into it: git clone https://github.com/facebookresearch/detectron2 "
                     f"DIR && {dimension_route.python} -m pip install --no-build-isolation DIR")
        hint += ")"
    return f"{dimension}: {summary}{hint}"


def prepare(dimensions: list[str], cache: Path, logs: Path, monkeypatch) -> dict:
    """Where each dimension runs (stas's probe) with its random weights built in `cache` by that interpreter; skips
    the test, with the reasons, when an interpreter cannot run one or the suite cannot build what one loads."""
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))  # DINO's hubconf reads its weights there
    for name, value in hub_environment(cache).items():  # where the builder puts bert-base-uncased
        monkeypatch.setenv(name, value)
    options = compose([*interpreters(dimensions), f"eval.vbench.cache_dir={cache}"]).eval.vbench
    routes = VBenchRunner(options, "cpu", logs).plan(dimensions)
    reasons = [reason for dimension in dimensions
               if (reason := problem(dimension, routes[dimension]) or unbuildable(dimension))]
    if reasons:
        pytest.skip("; ".join(reasons))
    for dimension in dimensions:
        subprocess.run([routes[dimension].python, str(WEIGHT_BUILDER), str(cache), dimension], check=True)
    return routes


def where(dimension_route) -> str:
    return f"{'separate' if dimension_route.separate else 'beside stas'}: {dimension_route.python}"


@pytest.mark.vbench_full
@pytest.mark.parametrize("dimension", DIMENSIONS)
def test_a_dimension_gives_every_video_a_finite_value_with_random_weights(dimension, weights_cache, tmp_path,
                                                                          capsys, monkeypatch):
    dimension_route = prepare([dimension], weights_cache, tmp_path / "probe", monkeypatch)[dimension]
    _, run_dir = make_run(tmp_path, prompt_overrides(dimension))
    videos = sorted(path.name for path in (run_dir / VIDEOS_DIR).glob("*.mp4"))
    start = time.perf_counter()
    evaluate_main([str(run_dir), "eval.evaluators=[vbench]", f"eval.vbench.dimensions=[{dimension}]",
                   f"eval.vbench.mode={mode(dimension)}", f"eval.vbench.cache_dir={weights_cache}",
                   *interpreters([dimension]), "logger=none"])
    seconds_per_video = (time.perf_counter() - start) / len(videos)
    output = capsys.readouterr().out
    rows = [row for row in read_jsonl(run_dir / METRICS_FILE) if row["evaluator"] == "vbench"]
    assert [row["metric"] for row in rows] == [dimension] * len(videos), output
    assert sorted(row["video"] for row in rows) == videos
    scored = [row for row in rows if row["value"] is not None]
    # color gives no value to a video where GRiT detects nothing: such a video has VBench's documented row instead
    unscored = [row for row in rows if row["value"] is None]
    assert all(dimension in LEFT_OUT and row["excluded"] == LEFT_OUT[dimension] for row in unscored), unscored
    assert all(isinstance(row["value"], float) and math.isfinite(row["value"]) for row in scored), rows
    aggregate = json.loads((run_dir / AGGREGATE_FILE).read_text())
    if scored:
        assert math.isfinite(aggregate["vbench"]["dimensions"][dimension])
    else:
        assert sorted(entry["video"] for entry in aggregate["excluded"]) == videos
    with capsys.disabled():
        print(f"\n{dimension}: {seconds_per_video:.1f} s per video ({len(videos)} video(s), {where(dimension_route)})")


@pytest.mark.vbench_full
def test_one_run_scored_on_all_sixteen_dimensions_has_quality_semantic_and_total(weights_cache, tmp_path, capsys,
                                                                                   monkeypatch):
    """docs/evaluation.md's check of the whole suite: a run of `prompts=vbench prompts.per_dimension=1` (11 videos,
    each dimension scores one) and one `stas.evaluate RUN eval=vbench_standard` call give every dimension its row,
    and metrics.json Quality, Semantic and Total, each computed or withheld with the reason (random weights give
    values out of range, and GRiT detects no coloured object), none merely missing."""
    routes = prepare(DIMENSIONS, weights_cache, tmp_path / "probe", monkeypatch)
    _, run_dir = make_run(tmp_path, ["prompts=vbench", "prompts.per_dimension=1", "prompts.samples_per_prompt=1",
                                     "prompts.limit=null"])
    videos = sorted(path.name for path in (run_dir / VIDEOS_DIR).glob("*.mp4"))
    start = time.perf_counter()
    evaluate_main([str(run_dir), "eval=vbench_standard", "eval.evaluators=[vbench]",
                   f"eval.vbench.cache_dir={weights_cache}", *interpreters(DIMENSIONS), "logger=none"])
    seconds = time.perf_counter() - start
    output = capsys.readouterr().out
    rows = [row for row in read_jsonl(run_dir / METRICS_FILE) if row["evaluator"] == "vbench"]
    assert len(videos) == 11 and sorted(row["metric"] for row in rows) == sorted(DIMENSIONS), output
    for row in rows:
        if row["value"] is None:
            assert row["metric"] in LEFT_OUT and row["excluded"] == LEFT_OUT[row["metric"]], row
        else:
            assert isinstance(row["value"], float) and math.isfinite(row["value"]), row
    vbench = json.loads((run_dir / AGGREGATE_FILE).read_text())["vbench"]
    assert vbench["missing"] == {}, vbench
    for score in ("quality_score", "semantic_score", "total_score"):
        computed, withheld = score in vbench, vbench["withheld"].get(score)
        assert computed != bool(withheld), (score, vbench)
        assert not computed or math.isfinite(vbench[score])
        assert f"vbench {score}" in output
    with capsys.disabled():
        print(f"\nall 16 dimensions on {len(videos)} videos in one evaluate call: {seconds:.0f} s "
              f"({', '.join(f'{d} {where(r)}' for d, r in routes.items() if r.separate) or 'none separate'})")
        for score in ("quality_score", "semantic_score", "total_score"):
            print(f"  {score}: " + (f"{vbench[score]:.2f} %" if score in vbench else
                                    f"withheld, {vbench['withheld'][score]}"))
