"""Hyperparameter search (hydra/sweeper=search: Hydra's Optuna sweeper over stas.run): a run returns search.metric of
its metrics.json; a real search on the tiny twin finds the best of its trials; a missing metric is named with the
ones there."""

import json
import re

import pytest
import yaml

from stas.errors import UserError
from stas.evaluation import aggregate_metrics
from stas.evaluation.records import aggregate_value, aggregate_values

from conftest import compose, run_cli

ROWS = [{"video": f"v{i}.mp4", "evaluator": evaluator, "metric": metric, "value": value, "weight": 2}
        for i, (evaluator, metric, value) in enumerate([("pixel", "consistency", 0.8), ("pixel", "consistency", 0.6),
                                                         ("pixel", "chunk_gap", 0.1)])]


def test_a_metric_is_its_pooled_value_and_vbench_scores_are_there_too():
    aggregate = aggregate_metrics(ROWS)
    assert aggregate_values(aggregate) == {"pixel/consistency": pytest.approx(0.7), "pixel/chunk_gap": 0.1}
    assert aggregate_value({**aggregate, "vbench": {"quality_score": 81.5}}, "vbench/quality_score", "m") == 81.5


def test_a_missing_metric_names_itself_the_metrics_there_and_why_it_is_missing():
    aggregate = {**aggregate_metrics(ROWS + [{"video": "v3.mp4", "evaluator": "clip", "metric": "consistency",
                                              "value": None, "error": "bad frames"}]),
                 "skipped": {"dino": ["dino: weights not found in ~/.cache/torch/hub", "place them at ..."]}}
    with pytest.raises(UserError) as missing:
        aggregate_value(aggregate, "dino/consistency", "run/metrics.json")
    assert str(missing.value) == ("search.metric='dino/consistency' is not in run/metrics.json; its metrics: "
                                  "pixel/chunk_gap, pixel/consistency; dino was skipped: dino: weights not found in "
                                  "~/.cache/torch/hub")
    with pytest.raises(UserError, match=r"'clip/consistency' .*; 1 video\(s\) could not be scored for it"):
        aggregate_value(aggregate, "clip/consistency", "run/metrics.json")


def test_a_run_without_a_search_returns_nothing(tmp_path):
    from stas.run import search_objective

    assert search_objective(compose([]), tmp_path) is None
    (tmp_path / "metrics.json").write_text(json.dumps(aggregate_metrics(ROWS)))
    assert search_objective(compose(["search.metric=pixel/consistency"]), tmp_path) == pytest.approx(0.7)


def trial_value(run_dir, metric):
    return aggregate_values(json.loads((run_dir / "metrics.json").read_text()))[metric]


def trial_params(run_dir):
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    return {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in overrides)
            if key.startswith("steer.")}


@pytest.mark.slow
def test_the_tiny_search_finds_the_best_of_its_trials(tmp_path):
    """experiments/tiny_search for real (3 trials through Hydra's Optuna sweeper): optimization_results.yaml holds
    the trial whose metrics.json has the best value, with parameters inside the search space."""
    result = run_cli("stas.run", "-m", "experiment=tiny_search", "hydra.sweeper.n_trials=3", "logger=none",
                     "progress=false", f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "tiny_search"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [run_dir for run_dir in sweep.iterdir() if (run_dir / "run_identity.yaml").is_file()]
    assert len(trials) == 3 and (sweep / "multirun.yaml").is_file()
    values = {run_dir: trial_value(run_dir, "pixel/consistency") for run_dir in trials}
    assert len(set(values.values())) > 1  # the settings change the videos: the search has something to choose
    winner = max(values, key=values.get)
    assert best["best_value"] == values[winner]
    params = best["best_params"]
    assert params == trial_params(winner)
    assert set(params) == {"steer.alpha", "steer.window.end", "steer.boundary_width"}
    assert 0.5 <= params["steer.alpha"] <= 3.0 and 0.25 <= params["steer.window.end"] <= 1.0
    assert params["steer.boundary_width"] in range(1, 7)
    for run_dir in trials:  # each trial printed the value it returned
        assert f"search.metric pixel/consistency = {values[run_dir]!r} (to maximize)" in result.stdout


@pytest.mark.slow
def test_a_search_for_a_metric_the_runs_lack_names_the_metrics_there(tmp_path):
    result = run_cli("stas.run", "-m", "experiment=tiny_search", "hydra.sweeper.n_trials=2", "logger=none",
                     "progress=false", "model.steps=2", "search.metric=pixel/sharpness", f"paths.root={tmp_path}",
                     cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(r"^stas\.run \(job 0\): error: search\.metric='pixel/sharpness' is not in \S+/metrics\.json; "
                     r"its metrics: pixel/chunk_gap, pixel/consistency, ", result.stderr, re.M), result.stderr
    sweep = tmp_path / "multirun" / "tiny_search"
    assert (sweep / "multirun.yaml").is_file() and not (sweep / "optimization_results.yaml").exists()


@pytest.mark.slow
def test_a_search_without_a_metric_stops_before_its_first_video(tmp_path):
    result = run_cli("stas.run", "-m", "experiment=tiny_search", "search.metric=null", "logger=none",
                     f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stas.run (job 0): error: the sweeper (hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper) " \
           "optimises what each run returns: set search.metric=" in result.stderr
    sweep = tmp_path / "multirun" / "tiny_search"
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]
