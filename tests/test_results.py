"""A tiny 2 x 2 grid end to end: multirun, evaluation, tables with paired bootstrap CIs; and the table maths."""

import importlib.util
import re

import numpy as np
import pandas as pd
import pytest

from stas.results import find_runs, paired_bootstrap, to_latex

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
    assert sorted(zip(paper["Model"], paper["Method"])) == [
        ("tiny_cogvideox", "+STAS"), ("tiny_cogvideox", "Vanilla"), ("tiny_wan21", "+STAS"), ("tiny_wan21", "Vanilla")]
    assert {"vbench/temporal_flickering", "pixel/consistency", "pixel/cross_chunk_similarity", "pixel/intra_chunk_similarity", "pixel/chunk_gap"} <= set(paper)
    deltas = (tmp_path / "deltas.md").read_text()
    runs = find_runs([grid])
    for model in ("tiny_wan21", "tiny_cogvideox"):
        vanilla, steered = (next(r for r in runs if r.model == model and r.steered == s) for s in (False, True))
        a, b = vanilla.per_prompt()[("pixel", "consistency")], steered.per_prompt()[("pixel", "consistency")]
        assert sorted(a) == sorted(b) == ["a bird", "a cat", "a dog"]  # paired: same prompts and seeds
        delta = np.mean([b[p] - a[p] for p in a])
        row = next(line for line in deltas.splitlines() if model in line and "pixel/consistency" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(delta, abs=1e-3)
        assert float(cells[4]) <= float(cells[3]) <= float(cells[5])  # the point estimate lies in its CI
    assert "Subject Consistency" in (tmp_path / "paper_table.md").read_text()
    assert "tables written to" in capsys.readouterr().out


@pytest.mark.slow
def test_markdown_and_latex_are_well_formed(grid, tmp_path):
    tables_main()([str(grid), "--out", str(tmp_path), "--resamples", "50", "--wandb", "none"])
    for name in ("paper_table", "metrics_table", "deltas"):
        lines = (tmp_path / f"{name}.md").read_text().strip().splitlines()
        widths = {line.count("|") for line in lines}
        assert len(widths) == 1 and re.fullmatch(r"\|[-:| ]+\|", lines[1])
        tex = (tmp_path / f"{name}.tex").read_text()
        assert tex.count(r"\begin{") == tex.count(r"\end{") == 2
        body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
        columns = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1))
        header = tex.split(r"\toprule")[1].split(r"\midrule")[0].strip()
        for line in [header, *body]:
            assert line.endswith(r"\\") and len(re.split(r"(?<!\\)&", line)) == columns
        assert not re.search(r"(?<!\\)[_%#]", tex.replace(r"\_", "").replace(r"\%", "").replace(r"\#", "")
                             .split(r"\begin{tabular}")[1])


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
