"""Where runs go (named by what runs, `name=` and `paths.root` win, sweep cells named by their overrides), what
`--help` explains, and what the steer presets stas and stas_paper are."""

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from stas.config import ConfigError, SteerConfig, path_safe, validate
from stas.config.describe import describe_keys, undocumented
from stas.paths import CONF_DIR

from conftest import compose, run_cli

TIME = r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}"


def dirs_of(overrides=(), config_name="config"):
    from stas.cli import compose_config

    cfg = compose_config(list(overrides), with_hydra=True, config_name=config_name)
    return str(Path(cfg.hydra.run.dir)), str(Path(cfg.hydra.sweep.dir)), cfg


@pytest.mark.parametrize("overrides,run_dir,sweep_dir", [
    ([], rf"runs/tiny_wan21/stas/{TIME}", rf"multirun/{TIME}"),
    (["model=tiny_cogvideox", "steer=none"], rf"runs/tiny_cogvideox/none/{TIME}", rf"multirun/{TIME}"),
    (["name=my_try"], rf"runs/my_try/{TIME}", rf"multirun/my_try/{TIME}"),
    (["paths.root=/scratch/me", "steer=amplify"], rf"/scratch/me/runs/tiny_wan21/amplify/{TIME}",
     rf"/scratch/me/multirun/{TIME}"),
    (["experiment=tiny_paper_main"], rf"runs/tiny_paper_main/{TIME}", r"multirun/tiny_paper_main"),
    (["experiment=tiny_paper_main", "paths.root=/out"], rf"/out/runs/tiny_paper_main/{TIME}",
     r"/out/multirun/tiny_paper_main"),
])
def test_runs_are_named_by_what_runs_unless_named(overrides, run_dir, sweep_dir):
    run, sweep, _ = dirs_of(overrides)
    assert re.fullmatch(run_dir, run), run
    assert re.fullmatch(sweep_dir, sweep), sweep


def test_analysis_runs_are_named_too():
    run, _, _ = dirs_of(["model=tiny_wan22"], config_name="analyze")
    assert re.fullmatch(rf"runs/tiny_wan22/none/analyze-{TIME}", run), run
    run, _, _ = dirs_of(["name=x", "paths.root=/o"], config_name="analyze")
    assert re.fullmatch(rf"/o/runs/x/analyze-{TIME}", run), run


def test_sweep_cells_are_named_by_their_overrides():
    _, _, cfg = dirs_of()
    assert cfg.hydra.sweep._get_node("subdir")._value() == "${path_safe:${hydra.job.override_dirname}}"
    assert {"name", "paths.root", "logger", "progress", "eval"} <= set(cfg.hydra.job.config.override_dirname.exclude_keys)
    # What Hydra's override_dirname holds for a group override and an escaped space
    assert path_safe("model=tiny_wan21,prompts.prompts=[a\\ cat],steer/window=late") == \
        "model=tiny_wan21,prompts.prompts=[a cat],steer.window=late"
    assert path_safe("") == "run"
    long_a, long_b = path_safe("steer.alpha=1," + "x" * 400), path_safe("steer.alpha=2," + "x" * 400)
    assert len(long_a.encode()) <= 200 and long_a != long_b and long_a.startswith("steer.alpha=1,xxx")
    multibyte = path_safe("prompts.prompts=[" + "é" * 300 + "]")
    assert len(multibyte.encode()) <= 200 and multibyte.encode().decode() == multibyte


def test_paths_root_and_name_do_not_change_a_runs_identity():
    from stas.rundir import identity

    assert identity(compose(["paths.root=/a", "name=x"])) == identity(compose([]))


@pytest.mark.parametrize("root,message", [
    ("''", r"paths.root='' must name a directory"),
    ("'~/runs'", r"paths.root='~/runs': '~' is not expanded here"),
])
def test_bad_paths_root_is_named(root, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([f"paths.root={root}"]))


def test_paths_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"is a file, not a directory"):
        validate(compose([f"paths.root={tmp_path / 'f'}"]))


@pytest.mark.slow
def test_a_bad_paths_root_writes_nothing(tmp_path):
    result = run_cli("stas.run", "paths.root=''", cwd=tmp_path)
    assert result.returncode == 2 and "paths.root='' must name a directory" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("overrides,config_name", [([], "config"), (["model=wan21_1.3b"], "config"),
                                                    (["model=tiny_cogvideox"], "analyze")])
def test_every_key_has_an_explanation(overrides, config_name):
    """--help explains every key from the schema's comments: a field added without one fails here."""
    assert undocumented(compose(overrides, config_name=config_name)) == []


def test_help_text_has_each_key_its_value_and_what_it_does():
    text = describe_keys(compose(["steer.alpha=2"]))
    assert re.search(r"^  steer\.alpha=2\.0 +how hard to steer", text, re.M)
    assert re.search(r"^  detect\.ratio=\S+ +massive: channel peak > max\(ratio", text, re.M)
    assert re.search(r"^  model\.compile=none +none \| regional", text, re.M)
    assert re.search(r"^  paths\.root=\. +Where outputs go", text, re.M)


@pytest.mark.slow
def test_help_explains_the_keys(tmp_path):
    result = run_cli("stas.run", "--help", "steer.alpha=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== Keys" in out and re.search(r"^model: .*\bcogvideox2b\b", out, re.M)
    assert re.search(r"^  steer\.alpha=3\.0 +how hard to steer", out, re.M)
    assert re.search(r"^  detect\.ratio=\S+ +massive: channel peak", out, re.M)
    assert re.search(r"^  model\.compile=none +none \| regional", out, re.M)
    assert not list(tmp_path.iterdir())  # --help writes nothing
    analyze = run_cli("stas.analyze", "--help", cwd=tmp_path)
    assert analyze.returncode == 0 and re.search(r"^  analysis\.min_frequency=0\.5 +calibration:", analyze.stdout,
                                                 re.M)


def test_stas_paper_pins_every_steer_value_and_steers_like_stas_today():
    """stas follows the schema defaults; stas_paper writes out the paper's values, so the paper's experiments do
    not move when the defaults do. Today they steer identically (if a default changes, say so in both files)."""
    pinned = yaml.safe_load((CONF_DIR / "steer" / "stas_paper.yaml").read_text())
    assert {f.name for f in fields(SteerConfig)} - set(pinned) == {"window"}  # window: the `early` option
    stas, paper = (OmegaConf.to_container(compose([f"steer={name}"]).steer) for name in ("stas", "stas_paper"))
    assert stas.pop("name") == "stas" and paper.pop("name") == "stas_paper"
    assert stas == paper
