"""What the docs say a new user does and gets, checked against the code: the install lines, where runs go, which
experiment evaluates how."""

import re

import pytest

from stas.config import EXPERIMENTS_DIR

from conftest import REPO, compose

README = (REPO / "README.md").read_text()


def test_readme_installs_the_default_and_on_a_cpu_only_laptop():
    first = README.split("```bash\n", 1)[1].splitlines()
    assert first[0] == "pip install -e . && python -m stas.run"  # the default install stays what works here
    cpu = re.search(r"pip install torch torchvision --index-url https://download\.pytorch\.org/whl/cpu\n"
                    r"pip install -e \. && python -m stas\.run", README)
    assert cpu, "the README says how to install the CPU-only torch wheels"


def test_readme_names_run_directories_as_stas_makes_them():
    assert compose([]).name is None and "runs/default" not in README
    for text in ("runs/<model>/<steer>/<date>_<time>/", "runs/tiny_wan21/stas/", "multirun/<date>_<time>/",
                 "paths.root"):
        assert text in README


def eval_choice(experiment: str) -> str:
    from stas.cli import compose_config

    return compose_config([f"experiment={experiment}"], with_hydra=True).hydra.runtime.choices["eval"]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
def test_evaluation_docs_say_which_eval_each_experiment_chooses(experiment):
    docs = " ".join((REPO / "docs" / "evaluation.md").read_text().split())
    choice = eval_choice(experiment)
    if experiment in ("paper_main", "paper_main_extended", "baselines"):
        assert choice == "vbench_standard"
        assert ("`experiment=paper_main`, `experiment=paper_main_extended` and `experiment=baselines` choose "
                "`eval=vbench_standard`") in docs
    else:
        assert choice == "default"
        assert "The ablations (`ablation_*`) and the `tiny_*` experiments choose no `eval` option" in docs


def test_readme_side_by_side_example_runs_as_written(capsys):
    """The offline example: its stas.run lines write the run directories its side_by_side line reads, and every
    option it passes is one the script has."""
    import importlib.util

    from stas.cli import compose_config

    block = README.split("**Side by side.**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    runs, (compare,) = [line for line in block.splitlines() if "stas.run" in line], [
        line for line in block.splitlines() if "side_by_side.py" in line]
    for line in runs:
        overrides = line.split("#")[0].split()[3:]
        folder = compose_config(overrides, with_hydra=True).hydra.run.dir.rsplit("/", 1)[0]
        assert folder.removeprefix("./") in compare.split(), (line, folder)
    spec = importlib.util.spec_from_file_location("side_by_side_script", REPO / "analysis" / "side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    options = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
    assert {"--out", "--diff", "--diff-gain"} <= options
    assert [flag for flag in compare.split() if flag.startswith("--") and flag not in options] == []
