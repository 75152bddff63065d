"""Two VBench environments: the dimensions whose packages are too new beside stas (human_action, scene) go to
eval.vbench.separate_python, each dimension is probed in the environment that will run it, and
`python -m stas.evaluation.vbench_env PATH` makes that environment.

The routing tests use real second environments, made cheaply: a virtual environment that sees this one's packages
(--system-site-packages) with VBench's pins of the packages that matter installed over them (numpy 1, transformers
4, timm 1.0.12, plus fairscale for scene and openai-clip for human_action); and one without them, where the same dimensions are still too new. The
probe reads package versions and imports nothing heavy, so the same worker answers in both."""

import subprocess
import sys
from pathlib import Path

import pytest

from stas.config import ConfigError, validate
from stas.errors import UserError
from stas.evaluation.vbench import VBenchRunner
from stas.evaluation.vbench_env import PACKAGES, environment_python, main as vbench_env_main, make_vbench_env
from stas.evaluation.vbench_worker import CACHE_FILES

from conftest import compose

DIMENSIONS = ["human_action", "scene", "temporal_flickering"]
PINS = ["numpy<2", "transformers<5", "timm==1.0.12", "fairscale", "openai-clip", "setuptools<81"]


def side_environment(path: Path, *packages: str) -> str:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True)
    python = environment_python(path)
    if packages:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, capture_output=True)
    return str(python)


@pytest.fixture(scope="module")
def pinned_python(tmp_path_factory) -> str:
    return side_environment(tmp_path_factory.mktemp("pinned") / "env", *PINS)


@pytest.fixture(scope="module")
def unpinned_python(tmp_path_factory) -> str:
    return side_environment(tmp_path_factory.mktemp("unpinned") / "env")


def runner(tmp_path, *overrides) -> VBenchRunner:
    cache = tmp_path / "cache"
    for dimension in DIMENSIONS:
        for relative, _ in CACHE_FILES[dimension]:
            (cache / relative).parent.mkdir(parents=True, exist_ok=True)
            (cache / relative).write_bytes(b"")
    return VBenchRunner(compose([f"eval.vbench.cache_dir={cache}", *overrides]).eval.vbench, "cpu", tmp_path / "logs")


def too_new_here() -> bool:
    from importlib import metadata

    return int(metadata.version("numpy").split(".")[0]) >= 2 and \
        int(metadata.version("transformers").split(".")[0]) >= 5


@pytest.mark.slow
def test_too_new_dimensions_go_to_the_separate_environment_and_are_probed_there(tmp_path, pinned_python):
    if not too_new_here():
        pytest.skip("this environment has VBench's own pins")
    routes = runner(tmp_path, f"eval.vbench.separate_python={pinned_python}").plan(DIMENSIONS)
    assert routes["temporal_flickering"].python == sys.executable and not routes["temporal_flickering"].separate
    for dimension in ("human_action", "scene"):
        assert routes[dimension].separate and routes[dimension].python == pinned_python
        assert routes[dimension].problems is None, routes[dimension].problems
        assert routes[dimension].describe() == f"runs in separate VBench environment {pinned_python}: ready"
    assert routes["temporal_flickering"].problems is None


@pytest.mark.slow
def test_the_separate_environment_reports_its_own_problems(tmp_path, unpinned_python):
    """A separate environment with this stack's versions: the dimensions still go there, and the probe says what is
    too new *there*, naming that interpreter (so the routing check can fail)."""
    if not too_new_here():
        pytest.skip("this environment has VBench's own pins")
    problems = runner(tmp_path, f"eval.vbench.separate_python={unpinned_python}").probe(DIMENSIONS)
    assert f"package(s) too new in {unpinned_python}: numpy" in problems["human_action"]
    assert f"package(s) too new in {unpinned_python}: transformers" in problems["scene"]
    assert problems["temporal_flickering"] is None


def test_without_a_separate_environment_the_message_says_how_to_make_one(tmp_path):
    if not too_new_here():
        pytest.skip("this environment has VBench's own pins")
    problems = runner(tmp_path).probe(["human_action"])
    assert "python -m stas.evaluation.vbench_env PATH" in problems["human_action"]
    assert "eval.vbench.separate_python=PATH/bin/python" in problems["human_action"]


def test_a_separate_environment_that_cannot_run_skips_only_its_dimensions(tmp_path):
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    routes = runner(tmp_path, f"eval.vbench.separate_python={broken}").plan(DIMENSIONS)
    assert routes["temporal_flickering"].problems is None
    if too_new_here():
        assert routes["human_action"].separate
        assert routes["human_action"].problems.startswith("the separate VBench environment cannot run them: the "
                                                          f"VBench worker ({broken}) exited with code 3")


def test_a_missing_separate_interpreter_is_refused_at_start_up():
    cfg = compose(["eval.evaluators=[vbench]", "eval.vbench.dimensions=[human_action]",
                   "eval.vbench.separate_python=/nowhere/bin/python"])
    with pytest.raises(ConfigError, match=r"eval\.vbench\.separate_python='/nowhere/bin/python': no such executable"):
        validate(cfg)


def test_the_maker_refuses_a_directory_that_is_not_an_environment(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a virtual environment"):
        make_vbench_env(target)
    assert (target / "notes.txt").read_text() == "keep me" and len(list(target.iterdir())) == 1
    with pytest.raises(SystemExit) as exit_info:
        vbench_env_main([str(target / "notes.txt")])
    assert exit_info.value.code == 1
    assert "notes.txt exists and is not a virtual environment" in capsys.readouterr().err


@pytest.mark.slow
def test_the_maker_reports_pip_failures_with_their_output(tmp_path):
    """A real venv, and a pip that cannot resolve a package: the error ends with pip's own message."""
    with pytest.raises(UserError, match=r"(?s)installing torch .* failed \(exit code 1\):.*no-such-package-stas"):
        make_vbench_env(tmp_path / "env", ("no-such-package-stas==0",))
    assert (tmp_path / "env" / "pyvenv.cfg").is_file()  # made; a second call installs into it


@pytest.mark.vbench_full
def test_the_maker_builds_an_environment_where_human_action_and_scene_are_not_too_new(tmp_path):
    python = make_vbench_env(tmp_path / "vbench-env")
    routes = runner(tmp_path, f"eval.vbench.separate_python={python}").plan(DIMENSIONS)
    for dimension in ("human_action", "scene"):
        assert "too new" not in (routes[dimension].problems or ""), routes[dimension].problems
    versions = subprocess.run([str(python), "-c", "import numpy, transformers; print(numpy.__version__, "
                               "transformers.__version__)"], capture_output=True, text=True, check=True).stdout
    assert versions.startswith("1.") and " 4." in versions
    assert "vbench==0.1.5" in PACKAGES
