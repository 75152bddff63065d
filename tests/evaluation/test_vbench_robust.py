"""VBench beside real runs: a bad raw value (outside [0, 1], NaN) is flagged and withholds the scores built on it
instead of crashing every later evaluation of the run."""

import json
import random

import pytest

from stas.evaluate import main as evaluate_main
from stas.evaluation import aggregate_metrics, vbench_scores
from stas.evaluation.records import AGGREGATE_FILE, METRICS_FILE
from stas.evaluation.scores import DIMENSIONS, QUALITY_DIMENSIONS
from stas.evaluation.vbench_worker import LEFT_OUT
from stas.rundir import read_jsonl

from evaluation_helpers import make_run

PIXEL = ["eval.evaluators=[pixel]", "logger=none", "progress=false"]


def valid_raw(seed=0):
    rng = random.Random(seed)
    return {d: rng.uniform(0.3, 1.0) for d in DIMENSIONS}


def test_a_valid_set_gives_every_score_and_flags_nothing():
    scores = vbench_scores(valid_raw())
    assert {"quality_score", "semantic_score", "total_score"} <= set(scores)
    assert scores["invalid"] == {} and scores["withheld"] == {} and scores["missing"] == {}
    assert set(scores["normalized"]) == set(DIMENSIONS)


@pytest.mark.parametrize("dimension, value, problem, withheld", [
    ("aesthetic_quality", -0.0027, "outside [0, 1]", {"quality_score", "total_score"}),  # random weights gave this
    ("scene", 1.5, "outside [0, 1]", {"semantic_score", "total_score"}),
    ("dynamic_degree", float("nan"), "NaN", {"quality_score", "total_score"}),
    ("color", "0.5", "not a number", {"semantic_score", "total_score"}),
])
def test_a_bad_raw_value_is_flagged_and_withholds_the_scores_built_on_it(dimension, value, problem, withheld):
    raw = {**valid_raw(), dimension: value}
    scores = vbench_scores(raw)  # no exception
    assert scores["invalid"] == {dimension: problem}
    assert set(scores["withheld"]) == withheld
    for score in withheld:
        assert score not in scores
        assert f"{dimension}={value!r} ({problem})" in scores["withheld"][score]
    expected = vbench_scores(valid_raw())
    for score in {"quality_score", "semantic_score"} - withheld:  # the other half is computed as before
        assert scores[score] == pytest.approx(expected[score])
    assert dimension not in scores["normalized"] and len(scores["normalized"]) == len(DIMENSIONS) - 1


def test_unknown_dimensions_are_still_a_programming_error():
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        vbench_scores({"subject_consistncy": 0.9})


def vbench_rows(run_dir, values: dict) -> list[dict]:
    """VBench rows of every video of a run, as the vbench evaluator writes them (weight 1), with given values."""
    pixel = [row for row in read_jsonl(run_dir / METRICS_FILE) if row["metric"] == "consistency"]
    return [{**{k: row[k] for k in ("video", "prompt", "seed", "video_sha256")}, "evaluator": "vbench",
             "metric": dimension, "value": value, "weight": 1} for row in pixel for dimension, value in values.items()]


def append_rows(run_dir, rows):
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)


def test_a_run_with_an_out_of_range_row_is_not_poisoned(tmp_path, capsys):
    cfg, run_dir = make_run(tmp_path, ["eval.evaluators=[pixel]"])
    evaluate_main([str(run_dir), *PIXEL])
    capsys.readouterr()
    # What random-init weights gave aesthetic_quality (issue 16); the rows stay in metrics.jsonl for good
    good = {d: 0.9 for d in QUALITY_DIMENSIONS if d != "aesthetic_quality"}
    append_rows(run_dir, vbench_rows(run_dir, {**good, "aesthetic_quality": -0.0027}))
    for _ in range(2):  # this evaluation, and every later one: exit 0 (it returns), no traceback
        evaluate_main([str(run_dir), *PIXEL])
        out = capsys.readouterr().out
        assert "nothing to evaluate: 2 video(s) already scored" in out
        assert "vbench quality_score: withheld, raw value(s) not a number in [0, 1]: aesthetic_quality=-0.0027" in out
        assert "FLAGGED vbench/aesthetic_quality: raw value -0.0027 outside [0, 1]" in out
    aggregate = json.loads((run_dir / AGGREGATE_FILE).read_text())
    vbench = aggregate["vbench"]
    assert vbench["dimensions"]["aesthetic_quality"] == pytest.approx(-0.0027)  # kept, as VBench computed it
    assert vbench["invalid"] == {"aesthetic_quality": "outside [0, 1]"}
    assert "quality_score" not in vbench and "aesthetic_quality=-0.0027" in vbench["withheld"]["quality_score"]
    assert sorted(vbench["flagged"]["aesthetic_quality"]) == sorted(p.name for p in (run_dir / "videos").iterdir())
    assert aggregate["metrics"]["vbench/aesthetic_quality"]["mean"] == pytest.approx(-0.0027)
    rows = read_jsonl(run_dir / METRICS_FILE)
    assert sum(row["metric"] == "aesthetic_quality" and row["value"] == -0.0027 for row in rows) == 2
    # The same run with valid values (say, real weights) gives its Quality score
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows if r["evaluator"] != "vbench"))
    append_rows(run_dir, vbench_rows(run_dir, {**good, "aesthetic_quality": 0.5}))
    evaluate_main([str(run_dir), *PIXEL])
    vbench = json.loads((run_dir / AGGREGATE_FILE).read_text())["vbench"]
    assert vbench["invalid"] == {} and vbench["withheld"] == {} and vbench["flagged"] == {}
    assert vbench["quality_score"] == pytest.approx(vbench_scores({**good, "aesthetic_quality": 0.5})["quality_score"])
    assert "vbench quality_score" in capsys.readouterr().out


def test_aggregate_flags_rows_out_of_range_even_when_the_dimension_value_is_in_range():
    rows = [{"video": "a.mp4", "evaluator": "vbench", "metric": "imaging_quality", "value": 1.2, "weight": 1},
            {"video": "b.mp4", "evaluator": "vbench", "metric": "imaging_quality", "value": 0.2, "weight": 1}]
    vbench = aggregate_metrics(rows)["vbench"]
    assert vbench["flagged"] == {"imaging_quality": ["a.mp4"]}
    assert vbench["invalid"] == {} and vbench["dimensions"]["imaging_quality"] == pytest.approx(0.7)


def test_a_search_on_a_withheld_score_says_why():
    from stas.errors import UserError
    from stas.evaluation.records import aggregate_value

    rows = [{"video": "a.mp4", "evaluator": "vbench", "metric": d, "value": 0.9, "weight": 1} for d in DIMENSIONS]
    rows[0]["value"] = float("-0.5")
    with pytest.raises(UserError, match=r"VBench's total_score is withheld: raw value\(s\) not a number in \[0, 1\]: "
                                        r"subject_consistency=-0.5 \(outside \[0, 1\]\)"):
        aggregate_value(aggregate_metrics(rows), "vbench/total_score", "run/metrics.json")
    semantic = vbench_scores({d: 0.9 for d in DIMENSIONS})["semantic_score"]
    assert aggregate_value(aggregate_metrics(rows), "vbench/semantic_score", "m") == pytest.approx(semantic)


def color_excluded_rows(videos=("a.mp4", "b.mp4")) -> list[dict]:
    return [{"video": video, "evaluator": "vbench", "metric": "color", "value": None, "excluded": LEFT_OUT["color"]}
            for video in videos]


def test_a_dimension_with_every_video_excluded_withholds_its_scores_instead_of_calling_them_missing():
    """color with no object detected in any video has no value, by VBench's rule: Semantic and Total are withheld
    with that reason (evaluating again would give none), not listed as missing a dimension to evaluate."""
    rows = [{"video": "a.mp4", "evaluator": "vbench", "metric": d, "value": 0.9, "weight": 1}
            for d in DIMENSIONS if d != "color"] + color_excluded_rows()
    vbench = aggregate_metrics(rows)["vbench"]
    assert vbench["unscored"] == {"color": f"all 2 video(s) excluded: {LEFT_OUT['color']}"}
    assert vbench["missing"] == {} and "color" not in vbench["dimensions"]
    assert "quality_score" in vbench and "semantic_score" not in vbench and "total_score" not in vbench
    for score in ("semantic_score", "total_score"):
        assert vbench["withheld"][score] == f"no value for color (all 2 video(s) excluded: {LEFT_OUT['color']})"
    # One video with a value: color has its value from that video, every score is computed
    scored = aggregate_metrics([*rows, {"video": "c.mp4", "evaluator": "vbench", "metric": "color", "value": 0.5,
                                        "weight": 1}])["vbench"]
    assert scored["unscored"] == {} and scored["withheld"] == {} and scored["dimensions"]["color"] == 0.5
    assert {"quality_score", "semantic_score", "total_score"} <= set(scored)
    # Without color's rows at all it is missing, as before: it was never evaluated
    never = aggregate_metrics(rows[:-2])["vbench"]
    assert never["missing"]["semantic_score"] == ["color"] and never["withheld"] == {}


def test_both_reasons_are_given_when_a_score_has_an_invalid_and_an_unscored_dimension():
    raw = {**valid_raw(), "scene": float("nan")}
    del raw["color"]
    scores = vbench_scores(raw, {"color": "all 1 video(s) excluded: none detected"})
    assert scores["withheld"]["semantic_score"] == ("raw value(s) not a number in [0, 1]: scene=nan (NaN); no value "
                                                    "for color (all 1 video(s) excluded: none detected)")
    assert "quality_score" in scores and scores["missing"] == {}
    # A dimension that has a value is never unscored, and an unknown name is a programming error
    assert vbench_scores(valid_raw(), {"color": "x"})["withheld"] == {}
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        vbench_scores({}, {"colour": "x"})
