"""A tiny 2 x 2 grid end to end: multirun, evaluation, tables with paired bootstrap CIs; and the table maths."""

import importlib.util
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from stas.evaluation.significance import (adjust_pvalues, effect_size_dz, least_pairs, prompt_contributions,
                                          sign_flip_pvalue)
from stas.evaluation.significance import paired_bootstrap
from stas.results import (delta_display, delta_table, find_runs, methods_table, metrics_table, paper_table,
                          paper_table_notes, run_labels, table_order, vanilla_partner)
from stas.table_files import to_latex, to_markdown

from conftest import REPO, run_cli

EVAL = ["eval.evaluators=[pixel,vbench]", "eval.vbench.dimensions=[temporal_flickering]"]


def tables_main():
    spec = importlib.util.spec_from_file_location("tables_script", REPO / "analysis" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    result = run_cli("stas.run", "-m", "model=tiny_wan21,tiny_cogvideox", "steer=none,stas",
                     "prompts.prompts=[a cat,a dog,a bird]", "model.steps=3", "logger=none", "progress=false",
                     *EVAL, f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "sweep"


@pytest.mark.slow
def test_grid_aggregates_into_tables_with_confidence_intervals(grid, tmp_path, capsys):
    assert tables_main()([str(grid), "--out", str(tmp_path), "--resamples", "300", "--wandb", "none"]) == 0
    paper = pd.read_csv(tmp_path / "results.csv")
    assert list(zip(paper["Model"], paper["Method"])) == [  # sweep order, vanilla first
        ("tiny_wan21", "Vanilla"), ("tiny_wan21", "+STAS"), ("tiny_cogvideox", "Vanilla"), ("tiny_cogvideox", "+STAS")]
    assert {"vbench/temporal_flickering (%)", "pixel/consistency (raw)", "pixel/cross_chunk_similarity (raw)",
            "pixel/intra_chunk_similarity (raw)", "pixel/chunk_gap (raw)"} <= set(paper)
    deltas = pd.read_csv(tmp_path / "deltas.csv")
    runs = find_runs([grid])
    for model in ("tiny_wan21", "tiny_cogvideox"):
        vanilla, steered = (next(r for r in runs if r.model == model and r.steered == s) for s in (False, True))
        a, b = vanilla.per_prompt()[("pixel", "consistency")], steered.per_prompt()[("pixel", "consistency")]
        assert sorted(a) == sorted(b) == ["a bird", "a cat", "a dog"]  # paired: same prompts and seeds
        delta = np.mean([b[p] - a[p] for p in a])
        row = deltas[(deltas["model"] == model) & (deltas["metric"] == "pixel/consistency")].iloc[0]
        assert row["delta"] == pytest.approx(delta, abs=1e-9) and row["n_pairs"] == 3
        assert row["ci_low"] <= row["delta"] <= row["ci_high"]  # the point estimate lies in its interval
        assert row["verdict"] == "n too small"  # 3 prompts: below --min-pairs 6
    assert (deltas[deltas["metric"].str.startswith("vbench/")]["unit"] == "%").all()
    paper_md = (tmp_path / "paper_table.md").read_text()  # temporal_flickering alone fills no paper column
    assert paper_md.startswith("No paper table")
    assert "Subject Consistency (%): VBench's subject_consistency is missing in every run." in paper_md
    assert "tables written to" in capsys.readouterr().out


@pytest.mark.slow
def test_markdown_and_latex_are_well_formed(grid, tmp_path):
    tables_main()([str(grid), "--out", str(tmp_path), "--resamples", "100", "--wandb", "none"])
    for name in ("metrics_table", "deltas"):
        lines = (tmp_path / f"{name}.md").read_text().strip().splitlines()
        widths = {line.count("|") for line in lines}
        assert len(widths) == 1 and re.fullmatch(r"\|[-:| ]+\|", lines[1])
        assert "nan" not in (tmp_path / f"{name}.md").read_text()
        tex = (tmp_path / f"{name}.tex").read_text()
        assert tex.count(r"\begin{") == tex.count(r"\end{") == 2
        body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
        columns = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1))
        header = tex.split(r"\toprule")[1].split(r"\midrule")[0].strip()
        for line in [header, *body]:
            assert line.endswith(r"\\") and len(re.split(r"(?<!\\)&", line)) == columns
        assert not re.search(r"(?<!\\)[_%#]", tex.replace(r"\_", "").replace(r"\%", "").replace(r"\#", "")
                             .split(r"\begin{tabular}")[1])
    tex = (tmp_path / "paper_table.tex").read_text()  # no table: the reason, as LaTeX comments and one line of text
    assert all(line.startswith("%") for line in tex.splitlines()[:-1]) and "No paper table" in tex.splitlines()[-1]


def test_latex_escapes_special_characters():
    tex = to_latex(pd.DataFrame({"Method": ["+STAS (targets=first_frame+boundary, 50%)"], "Delta": [0.5]}), "c", "l")
    assert r"first\_frame+boundary, 50\%" in tex and r"0.50 \\" in tex


def test_paired_bootstrap_is_paired_and_covers_the_truth():
    rng = np.random.default_rng(1)
    prompts = [f"p{i}" for i in range(200)]
    base = {p: v for p, v in zip(prompts, rng.normal(0.9, 0.05, 200))}
    shifted = {p: base[p] + 0.01 + rng.normal(0, 0.001) for p in prompts}  # tiny effect, tiny pair noise
    delta, low, high, n = paired_bootstrap({"m": base}, {"m": shifted}, lambda m: m["m"], 1000, seed=0)
    assert n == 200 and low > 0 and low < 0.01 < high and delta == pytest.approx(0.01, abs=5e-4)
    # unpaired noise of the same size would hide the effect; pairing is what makes it visible
    assert high - low < 0.002


@pytest.mark.slow
def test_empty_and_incomplete_sweeps_say_what_is_missing(grid, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert tables_main()([str(tmp_path / "empty"), "--out", str(tmp_path / "t"), "--wandb", "none"]) == 2
    assert "holds no run" in capsys.readouterr().err
    result = run_cli("stas.run", "prompts.prompts=[a cat,a dog]", "model.steps=2", "logger=none", "eval=none",
                     "progress=false", f"hydra.run.dir={tmp_path / 'unscored'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (tmp_path / "unscored" / "videos" / "a dog-0.mp4").unlink()
    code = tables_main()([str(grid), str(tmp_path / "unscored"), "--out", str(tmp_path / "t"), "--wandb", "none"])
    err = capsys.readouterr().err
    assert code == 3 and "INCOMPLETE" in err
    assert "1 of 2 videos not generated (first: 'a dog' sample 0)" in err
    assert "1 of 1 videos have no metrics (run: python -m stas.evaluate" in err


# ------------------------------------------------------------------------ statistics of the deltas (fake runs)


def fake_run(directory, model="m", steer="stas", metrics=(), choices=None, job=None, steer_keys=None, **model_keys):
    """A run directory as stas.run and stas.evaluate leave it, without videos: run_identity.yaml, metrics.jsonl rows
    {(evaluator, metric): {prompt: [value of each sample]}}, and .hydra/hydra.yaml when `choices` or `job` is given."""
    directory.mkdir(parents=True)
    identity = {"model": {"name": model, "fps": 8, **model_keys},
                "steer": {"name": steer, "enabled": steer != "none", **(steer_keys or {})}}
    (directory / "run_identity.yaml").write_text(yaml.safe_dump(identity))
    rows = [{"video": f"{prompt}-{k}.mp4", "prompt": prompt, "seed": k, "evaluator": evaluator, "metric": metric,
             "value": float(value)}
            for (evaluator, metric), prompts in dict(metrics).items() for prompt, samples in prompts.items()
            for k, value in enumerate(samples)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if choices is not None or job is not None:
        (directory / ".hydra").mkdir()
        hydra = {"hydra": {"runtime": {"choices": {"hydra/launcher": "basic", **(choices or {})}},
                           "job": {"num": "???" if job is None else job}}}
        (directory / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    return directory


def pair(root, vanilla: dict, steered: dict, **keys):
    """A vanilla and a STAS run of one model under `root`, metrics as fake_run takes them."""
    fake_run(root / "0", steer="none", metrics=vanilla, **keys)
    fake_run(root / "1", steer="stas", metrics=steered, **keys)
    return find_runs([root])


def samples(rng, prompts: int, shift: float = 0.0, noise: float = 0.01, base=None, per_prompt: int = 1):
    """{prompt: [values]}; with `base` (the vanilla side) each prompt's samples are base + shift + noise."""
    out = {}
    for i in range(prompts):
        centre = base[f"p{i}"][0] + shift if base is not None else rng.uniform(0.6, 0.9)
        out[f"p{i}"] = list(centre + rng.normal(0, noise, per_prompt))
    return out


def test_two_prompts_say_n_too_small_not_significant(tmp_path):
    rng = np.random.default_rng(0)
    base = samples(rng, 2)
    runs = pair(tmp_path, {("pixel", "consistency"): base},
                {("pixel", "consistency"): samples(rng, 2, shift=0.2, noise=1e-4, base=base)})
    row = delta_table(runs, 200, permutations=1000).iloc[0]
    assert row["n_pairs"] == 2 and row["delta"] == pytest.approx(0.2, abs=1e-3)
    assert row["verdict"] == "n too small" and pd.isna(row["significant"]) and np.isnan(row["p_adjusted"])
    assert row["p_value"] == 0.5  # the exact test: 2 of the 4 sign patterns are as extreme
    assert delta_display(delta_table(runs, 200)).iloc[0]["Significant"] == "n too small"


def test_planted_effect_is_significant_after_correction_and_null_metrics_are_not(tmp_path):
    rng = np.random.default_rng(1)
    vanilla = {("pixel", f"null{i}"): samples(rng, 30) for i in range(12)}
    vanilla[("pixel", "planted")] = samples(rng, 30)
    steered = {key: samples(rng, 30, noise=0.01, base=values) for key, values in vanilla.items()}
    steered[("pixel", "planted")] = samples(rng, 30, shift=0.01, noise=0.01, base=vanilla[("pixel", "planted")])
    frame = delta_table(pair(tmp_path, vanilla, steered), 300, permutations=2000).set_index("metric")
    assert frame.loc["pixel/planted", "significant"] and frame.loc["pixel/planted", "p_adjusted"] <= 0.05
    assert frame.loc["pixel/planted", "effect_size_dz"] > 0.5
    nulls = frame.drop(index="pixel/planted")
    assert not nulls["significant"].any() and (nulls["verdict"] == "not significant").all()
    assert (frame["correction"] == "holm").all() and (frame["n_pairs"] == 30).all()


def test_null_effect_on_many_prompts_is_not_significant_after_correction(tmp_path):
    rng = np.random.default_rng(2)
    vanilla = {("pixel", f"m{i}"): samples(rng, 60) for i in range(20)}
    steered = {key: samples(rng, 60, noise=0.02, base=values) for key, values in vanilla.items()}
    frame = delta_table(pair(tmp_path, vanilla, steered), 200, permutations=2000)
    assert not frame["significant"].any()
    assert frame["p_value"].min() < 0.2  # 20 null rows do spread their raw p-values: the test is not just blind


def test_correction_changes_a_verdict_the_raw_p_calls_significant(tmp_path):
    # two rows of 6 prompts, all six differences positive: each exact p = 2/64 = 0.03125
    rng = np.random.default_rng(3)
    vanilla = {("pixel", m): samples(rng, 6) for m in ("a", "b")}
    steered = {key: samples(rng, 6, shift=0.05, noise=0.001, base=values) for key, values in vanilla.items()}
    runs = pair(tmp_path, vanilla, steered)
    verdicts = {c: delta_table(runs, 200, correction=c) for c in ("none", "holm", "bh")}
    assert (verdicts["none"]["p_value"] == 0.03125).all() and verdicts["none"]["significant"].all()
    assert (verdicts["holm"]["p_adjusted"] == 0.0625).all() and not verdicts["holm"]["significant"].any()
    assert (verdicts["bh"]["p_adjusted"] == 0.03125).all() and verdicts["bh"]["significant"].all()
    # below the minimum number of pairs the same rows get no verdict at all
    assert (delta_table(runs, 200, min_pairs=7)["verdict"] == "n too small").all()


def test_adjusted_p_values_match_the_textbook_definitions():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02, np.nan])  # R's p.adjust
    np.testing.assert_allclose(adjust_pvalues(p, "bh"), [0.02, 0.04, 0.04, 0.02, np.nan])
    np.testing.assert_allclose(adjust_pvalues(p, "none"), p)
    with pytest.raises(ValueError, match="unknown correction 'bonferroni'"):
        adjust_pvalues(p, "bonferroni")


def test_sign_flip_p_values_exact_and_monte_carlo():
    assert sign_flip_pvalue([1.0] * 6) == 0.03125 and sign_flip_pvalue([1.0] * 5) == 0.0625
    assert least_pairs(0.05) == 6 and least_pairs(0.01) == 8
    assert sign_flip_pvalue([0.0, 0.0, 0.0]) == 1.0 and np.isnan(sign_flip_pvalue([]))
    rng = np.random.default_rng(4)
    d = rng.normal(0.3, 1.0, 12)
    exact = sign_flip_pvalue(d, permutations=4096)
    assert sign_flip_pvalue(d, permutations=4000, seed=1) == pytest.approx(exact, abs=0.02)  # Monte Carlo
    null = [sign_flip_pvalue(rng.normal(0, 1, 25), 500, seed=i) for i in range(200)]
    assert 0.01 <= np.mean(np.array(null) <= 0.05) <= 0.10  # valid: rejects a true null about alpha of the time
    assert effect_size_dz([1.0, 2.0, 3.0]) == pytest.approx(2.0) and np.isnan(effect_size_dz([1.0]))


def test_composite_resamples_dimensions_on_shared_prompts_together():
    rng = np.random.default_rng(5)
    base = {f"p{i}": v for i, v in enumerate(rng.uniform(0.5, 0.9, 80))}
    diff = {p: rng.normal(0.01, 0.02) for p in base}
    a = {"x": base, "y": base}
    b = {"x": {p: base[p] + diff[p] for p in base}, "y": {p: base[p] + diff[p] for p in base}}  # equal differences
    _, low1, high1, _ = paired_bootstrap({"x": a["x"]}, {"x": b["x"]}, lambda m: m["x"], 2000, seed=0)
    delta, low2, high2, n = paired_bootstrap(a, b, lambda m: m["x"] + m["y"], 2000, seed=0)
    # perfectly correlated dimensions: the interval of the sum is twice as wide (independent resampling: 1.41x)
    assert n == 80 and (high2 - low2) / (high1 - low1) == pytest.approx(2.0, rel=0.05)
    w = prompt_contributions(a, b, lambda m: m["x"] + m["y"])
    assert w.sum() == pytest.approx(delta) and len(w) == 80
    with pytest.raises(ValueError, match="not affine"):
        prompt_contributions(a, b, lambda m: m["x"] ** 2)


def test_deltas_csv_has_the_statistics_columns(tmp_path, capsys):
    rng = np.random.default_rng(6)
    vanilla = {("pixel", "consistency"): samples(rng, 8, per_prompt=2)}
    steered = {("pixel", "consistency"): samples(rng, 8, shift=0.05, base=vanilla[("pixel", "consistency")],
                                                 per_prompt=2)}
    pair(tmp_path / "sweep", vanilla, steered)
    out = tmp_path / "out"
    assert tables_main()([str(tmp_path / "sweep"), "--out", str(out), "--resamples", "200", "--wandb", "none",
                          "--correction", "bh"]) == 0
    csv = pd.read_csv(out / "deltas.csv")
    assert {"n_pairs", "delta", "ci_low", "ci_high", "p_value", "p_adjusted", "significant", "effect_size_dz",
            "unit", "verdict", "correction"} <= set(csv.columns)
    assert csv.loc[0, "n_pairs"] == 8 and csv.loc[0, "unit"] == "raw" and csv.loc[0, "correction"] == "bh"
    assert bool(csv.loc[0, "significant"]) and csv.loc[0, "ci_low"] <= csv.loc[0, "delta"] <= csv.loc[0, "ci_high"]
    printed = capsys.readouterr().out
    assert "Benjamini-Hochberg correction over 1 row(s) with at least 6 pairs" in printed
    assert "p adj. (Benjamini-Hochberg)" in (out / "deltas.md").read_text()


@pytest.mark.parametrize("option, value, says", [
    ("--min-pairs", "0", "--min-pairs 0: must be an integer of at least 2"),
    ("--alpha", "2", "--alpha 2.0: must be a number strictly between 0 and 1"),
    ("--resamples", "5", "--resamples 5: must be an integer of at least 100"),
    ("--correction", "bonferroni", "invalid choice: 'bonferroni'"),
])
def test_bad_statistics_options_are_one_clear_line(tmp_path, capsys, option, value, says):
    with pytest.raises(SystemExit) as exit_info:
        tables_main()([str(tmp_path), "--out", str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_tables_skip_run_directories_without_output_and_say_so(tmp_path, capsys):
    fake_run(tmp_path / "sweep" / "steer=none", steer="none", metrics={("pixel", "consistency"): {"a cat": [0.9]}})
    stub = tmp_path / "sweep" / "steer=stas"  # what a run that failed before its first video leaves
    stub.mkdir()
    (stub / "run_identity.yaml").write_text(yaml.safe_dump({"model": {"name": "m", "fps": 8},
                                                            "steer": {"name": "stas", "enabled": True}}))
    (stub / "items.jsonl").write_text('{"key": "0:0", "prompt": "a cat", "index": 0, "seed": 0}\n')
    (stub / "videos").mkdir()
    skipped = []
    assert [run.path for run in find_runs([tmp_path / "sweep"], skipped)] == [tmp_path / "sweep" / "steer=none"]
    assert skipped == [stub]
    assert tables_main()([str(tmp_path / "sweep"), "--out", str(tmp_path / "t"), "--wandb", "none"]) == 0
    captured = capsys.readouterr()
    assert "tables: skipped 1 run directory without any output" in captured.err and str(stub) in captured.err
    assert "Vanilla" in (tmp_path / "t" / "metrics_table.md").read_text()
    assert "+STAS" not in (tmp_path / "t" / "metrics_table.md").read_text()
    assert tables_main()([str(stub), "--out", str(tmp_path / "t2"), "--wandb", "none"]) == 2
    assert f"{stub} holds no run with any output (no video, no record): {stub}" in capsys.readouterr().err


def test_runs_are_in_sweep_order_numeric_vanilla_first(tmp_path):
    for num in range(12):  # hydra.job.num subdirectories: 10 and 11 come after 9
        fake_run(tmp_path / "numbered" / str(num), steer="none" if num == 11 else "stas", steer_keys={"alpha": num})
    runs = find_runs([tmp_path / "numbered"])
    assert [r.path.name for r in runs] == [str(n) for n in range(12)]
    assert [r.path.name for r in table_order(runs)] == ["11", *map(str, range(11))]
    # override_dirname subdirectories: the job number Hydra recorded decides, not the name
    for job, name in enumerate(["steer=none", "steer=stas", "steer=amplify"]):
        fake_run(tmp_path / "named" / name, steer=name.split("=")[1], choices={}, job=job)
    assert [r.path.name for r in find_runs([tmp_path / "named"])] == ["steer=none", "steer=stas", "steer=amplify"]
    frame = metrics_table(find_runs([tmp_path / "named"]))
    assert list(frame["Method"]) == ["Vanilla", "+STAS", "+amplify"]


def test_ablation_rows_are_labelled_by_the_option_chosen(tmp_path):
    windows = {"early": (0.0, 0.4), "late": (0.6, 1.0), "all": (0.0, 1.0)}
    fake_run(tmp_path / "vanilla" / "0", steer="none", choices={"steer": "none"}, job=0)
    for job, (option, (start, end)) in enumerate(windows.items()):
        fake_run(tmp_path / "window" / str(job), choices={"steer": "stas", "steer/window": option}, job=job,
                 steer_keys={"window": {"start": start, "end": end}})
    runs = find_runs([tmp_path / "vanilla", tmp_path / "window"])
    assert run_labels(runs) == ["Vanilla", "+STAS (window=early)", "+STAS (window=late)", "+STAS (window=all)"]
    # runs that recorded no Hydra choices (made outside Hydra) keep the key=value labels
    for run in runs:
        run.choices = None
    assert run_labels(runs)[3] == "+STAS (window.end=1.0, window.start=0.0)"
    # a swept plain key is named by its key, also for the vanilla runs; the preset name is not repeated
    for job, (steer, scale) in enumerate([("none", 3.0), ("stas", 3.0), ("none", 7.0), ("stas", 7.0)]):
        fake_run(tmp_path / "guidance" / str(job), steer=steer, choices={"model": "m", "steer": steer}, job=job,
                 guidance_scale=scale)
    assert run_labels(find_runs([tmp_path / "guidance"])) == [
        "Vanilla (guidance_scale=3.0)", "+STAS (guidance_scale=3.0)", "Vanilla (guidance_scale=7.0)",
        "+STAS (guidance_scale=7.0)"]


def test_paper_table_without_vbench_says_which_dimensions_are_missing(tmp_path, capsys):
    rng = np.random.default_rng(7)
    vanilla = {("pixel", "consistency"): samples(rng, 3)}
    steered = {key: samples(rng, 3, base=values) for key, values in vanilla.items()}
    pair(tmp_path / "sweep", vanilla, steered)
    out = tmp_path / "out"
    assert tables_main()([str(tmp_path / "sweep"), "--out", str(out), "--resamples", "100", "--wandb", "none"]) == 0
    text = (out / "paper_table.md").read_text()
    assert text.startswith("No paper table") and "nan" not in text.lower()
    assert "Quality Score (%) needs all 7 quality dimensions; missing in every run: subject_consistency" in text
    assert "eval=vbench_standard" in text and "No paper table" in (out / "paper_table.tex").read_text()
    assert "paper_table: Total Score (%) needs all 16 VBench dimensions" in capsys.readouterr().out


def test_partial_paper_table_keeps_its_values_and_notes_the_rest(tmp_path):
    rng = np.random.default_rng(8)
    dims = ["subject_consistency", "background_consistency", "aesthetic_quality", "imaging_quality"]
    vanilla = {("vbench", d): samples(rng, 3) for d in dims}
    runs = pair(tmp_path, vanilla, {k: samples(rng, 3, base=v) for k, v in vanilla.items()})
    frame = paper_table(runs)
    assert list(frame.columns[2:4]) == ["Subject Consistency (%)", "Background Consistency (%)"]
    assert list(frame["Method"]) == ["Vanilla", "+STAS"] and frame["Subject Consistency (%)"].between(60, 90).all()
    notes = paper_table_notes(runs)
    assert notes[0].startswith("Quality Score (%) needs all 7 quality dimensions; missing in every run: "
                               "temporal_flickering, motion_smoothness, dynamic_degree.")
    assert len(notes) == 4 and not any("Subject" in note for note in notes)  # Quality, Semantic, Total, how to
    assert "nan" not in to_markdown(frame) and "| –" in to_markdown(frame)
    deltas = delta_table(runs, 100)
    assert set(deltas["unit"]) == {"%"} and "quality_score" not in set(deltas["metric"])
    # a run that lacks a dimension the others have is named
    fake_run(tmp_path / "2", steer="amplify", metrics={k: v for k, v in vanilla.items() if k[1] != "imaging_quality"})
    notes = paper_table_notes(find_runs([tmp_path]))
    assert "Imaging Quality (%): VBench's imaging_quality is missing in m +amplify." in notes


def test_detection_settings_belong_to_the_method_not_the_pairing(tmp_path):
    """A steered run with another `detect` than its vanilla run is still paired with it (vanilla runs detect
    nothing), and labelled by what its detection changed."""
    rng = np.random.default_rng(0)
    base = samples(rng, 8)
    metrics = {("pixel", "consistency"): base}
    for name, steer, detect in (("0", "none", {"rule": "mean_abs", "ratio": 20.0}),
                                ("1", "stas", {"rule": "mean_abs", "ratio": 20.0}),
                                ("2", "stas", {"rule": "channel_peak", "ratio": 10.0})):
        run_dir = fake_run(tmp_path / name, steer=steer, metrics=metrics)
        identity = yaml.safe_load((run_dir / "run_identity.yaml").read_text())
        (run_dir / "run_identity.yaml").write_text(yaml.safe_dump({**identity, "detect": detect}))
    runs = find_runs([tmp_path])
    vanilla = next(run for run in runs if not run.steered)
    assert all(vanilla_partner(run, runs) is vanilla for run in runs if run.steered)
    deltas = delta_table(runs)
    assert len(deltas) == 2
    labels = run_labels(runs)
    assert labels[0] == "Vanilla" and all("detect.rule=" in label for label in labels[1:])


@pytest.mark.slow
def test_tiny_baselines_sweep_gives_the_methods_table_with_nfe(tmp_path, capsys):
    """experiment=tiny_baselines (here 1 twin x {cfg, slg} x {none, STAS}, 1 prompt, 3 steps) then tables: one row per
    guidance x steering with its NFE (skip-layer guidance pays a third pass after step 0), and each steered run
    paired with the vanilla run of its own guidance."""
    result = run_cli("stas.run", "-m", "experiment=tiny_baselines", "model=tiny_wan21", "guidance=cfg,slg",
                     "steer=none,stas_paper", "prompts.limit=1", "model.steps=3", "logger=none", "progress=false",
                     "eval.evaluators=[pixel]", f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "tiny_baselines"
    assert tables_main()([str(sweep), "--out", str(tmp_path / "t"), "--wandb", "none"]) == 0
    methods = pd.read_csv(tmp_path / "t" / "methods.csv")
    assert [(g, m.split(" ")[0], nfe, steps) for g, m, nfe, steps in
            zip(methods["Guidance"], methods["Method"], methods["NFE"], methods["Steps"])] == [
        ("cfg", "Vanilla", 6, 3), ("cfg", "+STAS", 6, 3), ("slg", "Vanilla", 8, 3), ("slg", "+STAS", 8, 3)]
    assert methods["pixel/consistency (raw)"].notna().all() and (methods["Seconds"] > 0).all()
    assert "| NFE" in (tmp_path / "t" / "methods_table.md").read_text() or "NFE |" in (
        tmp_path / "t" / "methods_table.md").read_text()
    deltas = pd.read_csv(tmp_path / "t" / "deltas.csv")
    assert sorted(set(deltas["method"])) == ["+STAS (guidance=cfg)", "+STAS (guidance=slg)"]
    assert "| Guidance" in capsys.readouterr().out  # the cost of each method is printed


def test_a_score_withheld_for_an_out_of_range_value_is_named_in_the_notes(tmp_path):
    """Random weights give raw values outside [0, 1] (aesthetic_quality -0.0027): the Quality score is withheld,
    and the note says for which run and value; with every value in range the score is there and no note."""
    from stas.evaluation.scores import QUALITY_DIMENSIONS

    good = {("vbench", d): {"a cat": [0.5], "a dog": [0.6]} for d in QUALITY_DIMENSIONS}
    fake_run(tmp_path / "good" / "0", steer="none", metrics=good)
    assert not any("withheld" in note for note in paper_table_notes(find_runs([tmp_path / "good"])))
    assert paper_table(find_runs([tmp_path / "good"]))["Quality Score (%)"].notna().all()
    bad = {**good, ("vbench", "aesthetic_quality"): {"a cat": [-0.0027], "a dog": [-0.0027]}}
    fake_run(tmp_path / "bad" / "0", steer="none", metrics=bad)
    runs = find_runs([tmp_path / "bad"])
    assert paper_table(runs)["Quality Score (%)"].isna().all()
    notes = [note for note in paper_table_notes(runs) if "withheld" in note]
    assert notes and notes[0].startswith("m Vanilla: quality_score withheld, raw value(s) not a number in [0, 1]: "
                                         "aesthetic_quality=-0.0027")


def test_a_dimension_with_every_video_excluded_is_named_not_asked_for_again(tmp_path):
    """color evaluated with no object detected in any video has no value: the table notes say so and withhold
    Semantic and Total for it, instead of sending the user to evaluate color again."""
    from stas.evaluation.scores import DIMENSIONS

    values = {("vbench", d): {"a cat": [0.5]} for d in DIMENSIONS if d != "color"}
    run_dir = fake_run(tmp_path / "0", steer="none", metrics=values)
    with open(run_dir / "metrics.jsonl", "a") as rows:
        rows.write(json.dumps({"video": "a cat-0.mp4", "prompt": "a cat", "seed": 0, "evaluator": "vbench",
                               "metric": "color", "value": None, "excluded": "no object detected"}) + "\n")
    runs = find_runs([tmp_path])
    notes = paper_table_notes(runs)
    assert not any("missing" in note for note in notes), notes
    assert "m Vanilla: color has no value, all 1 video(s) excluded: no object detected." in notes
    assert ("m Vanilla: semantic_score withheld, no value for color (all 1 video(s) excluded: no object detected)."
            in notes)
    frame = paper_table(runs)
    assert frame["Quality Score (%)"].notna().all() and frame["Total Score (%)"].isna().all()
