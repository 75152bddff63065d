"""The `vbench` extra installs every package the probe asks for, for the dimensions that run beside this stack."""

import re
import tomllib
from pathlib import Path

from stas.evaluation.vbench_worker import PACKAGES

REPO = Path(__file__).resolve().parents[2]
# Import name -> distribution, where they differ; what this stack's own dependencies bring; what pip cannot install.
DISTRIBUTION = {"clip": "openai-clip", "pkg_resources": "setuptools", "cv2": "opencv-python-headless"}
STACK = {"transformers", "timm", "omegaconf"}
NOT_ON_PYPI = {"detectron2"}
OWN_ENVIRONMENT = {"human_action", "scene"}  # need VBench's own pins (numpy<2, transformers<5, ...)


def extra(name: str) -> dict[str, str]:
    """{distribution: its version specifier} of an optional dependency group of pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {re.match(r"[A-Za-z0-9_.-]+", r)[0].lower(): r for r in project["optional-dependencies"][name]}


def test_the_vbench_extra_has_what_every_dimension_beside_the_stack_imports():
    vbench = extra("vbench")
    for dimension, packages in PACKAGES.items():
        if dimension in OWN_ENVIRONMENT:
            continue
        for package in set(packages) - STACK - NOT_ON_PYPI:
            assert DISTRIBUTION.get(package, package) in vbench, (dimension, package)
    assert vbench["setuptools"] == "setuptools<81"  # openai-clip's clip.py imports pkg_resources (gone in 81)
    assert {"decord", "opencv-python-headless", "easydict"} <= set(vbench)  # VBench's loader, dynamic_degree


def test_the_test_extra_is_unchanged_by_it():
    assert set(extra("test")) == {"pytest", "hydra-submitit-launcher", "hydra-optuna-sweeper",
                                  "opencv-python-headless", "decord", "easydict"}
