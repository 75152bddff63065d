"""`python -m stas.evaluate RUN_DIR [overrides]`: score the videos of a run directory written by stas.run.

The model, steering and prompts come from the run directory (.hydra/config.yaml); the evaluation settings from the
command line, as overrides of the eval, logger and shard groups (default: eval=default). Re-running skips videos
already scored. Examples:
    python -m stas.evaluate runs/default/2026-01-01_12-00-00
    python -m stas.evaluate RUN_DIR eval.evaluators=[vbench] eval.vbench.dimensions=[temporal_flickering]
    python -m stas.evaluate RUN_DIR eval=vbench_standard eval.vbench.python=/opt/vbench-env/bin/python
    python -m stas.evaluate RUN_DIR shard.index=3 shard.count=8     # every 8th video, from the 4th
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stas.cli import compose_config, fail
from stas.config import ConfigError, validate
from stas.errors import UserError
from stas.evaluation import evaluate_run
from stas.tracking import RunLogger

TOOL = "stas.evaluate"
RUN_CONFIG = Path(".hydra") / "config.yaml"
# What an evaluation may change; everything else is the run's.
OVERRIDABLE = ("eval", "logger", "shard", "progress")


def evaluation_config(run_dir: Path, overrides: list[str]):
    """The run's saved config with this evaluation's eval, logger, shard and progress settings."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]
        if key not in OVERRIDABLE:
            raise ConfigError(f"override {override!r}: stas.evaluate takes the model, steering and prompts from the "
                              f"run directory; it accepts overrides of {', '.join(OVERRIDABLE)} only")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such directory (give the run directory written by stas.run)")
    saved_path = run_dir / RUN_CONFIG
    if not saved_path.is_file():
        raise UserError(f"{run_dir} is not a run directory of stas.run: it has no {RUN_CONFIG} "
                        "(a run directory holds .hydra/config.yaml, run_identity.yaml and videos/)")
    composed = compose_config(overrides)
    saved = OmegaConf.load(saved_path)
    try:
        return OmegaConf.merge(composed, {key: saved[key] for key in saved if key not in OVERRIDABLE})
    except OmegaConfBaseException as err:
        raise ConfigError(f"{saved_path} does not fit this version's config schema: "
                          f"{str(err).splitlines()[0]}") from None


def evaluate(run_dir: Path, overrides: list[str]):
    cfg = evaluation_config(run_dir, overrides)
    validate(cfg)
    if not cfg.eval.evaluators:
        raise ConfigError("eval.evaluators is empty (eval=none): name at least one of pixel, dino, clip, vbench")
    with RunLogger(cfg, run_dir, job_type="evaluate") as logger:
        summary = evaluate_run(cfg, run_dir, logger)
    if not summary.ran_anything:
        raise UserError(f"no evaluator could run:\n{summary}")
    return summary


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return
    positional = [arg for arg in args if "=" not in arg]
    if len(positional) != 1:
        fail(TOOL, f"give exactly one run directory (got {positional or 'none'}); usage: python -m {TOOL} RUN_DIR "
                   "[eval.KEY=VALUE ...]")
    try:
        summary = evaluate(Path(positional[0]), [arg for arg in args if "=" in arg])
    except UserError as err:
        fail(TOOL, str(err))
    print(f"{TOOL}: {summary}")


if __name__ == "__main__":
    main()
