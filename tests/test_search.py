"""Hyperparameter search: a run returns search.metric of its metrics.json; a missing metric is named with the ones
there."""

import json

import pytest

from stas.errors import UserError
from stas.evaluation import aggregate_metrics
from stas.evaluation.records import aggregate_value, aggregate_values

from conftest import compose

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
