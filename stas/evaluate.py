"""`python -m stas.evaluate RUN_DIR [overrides]`: score the videos of a run directory written by stas.run.

The config is the run's own (its Hydra overrides, .hydra/overrides.yaml) with the evaluation settings of this
command line: overrides of eval, logger, shard and progress (default: eval=default). Other overrides must agree
with the run (so the run's full override list, as the Slurm scripts pass it, is fine). Re-running skips videos
already scored; when every video is scored already it says so and opens no W&B run. Examples:
    python -m stas.evaluate runs/tiny_wan21/stas/2026-01-01_12-00-00
    python -m stas.evaluate RUN_DIR eval.evaluators=[vbench] eval.vbench.dimensions=[temporal_flickering]
    python -m stas.evaluate RUN_DIR eval=vbench_standard eval.vbench.python=/opt/vbench-env/bin/python
    python -m stas.evaluate RUN_DIR shard.index=3 shard.count=8     # every 8th video, from the 4th
    python -m stas.evaluate --vbench-weights [eval=vbench_standard] [eval.vbench.cache_dir=...]   # no RUN_DIR
The last lists every file the chosen VBench dimensions need (eval.vbench.dimensions), where each comes from, its
place in VBench's cache and whether it is there, and copies ViCLIP's BPE vocabulary from the openai-clip package.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from stas.cli import compose_config, fail, override_key
from stas.config import ConfigError, validate
from stas.errors import UserError
from stas.evaluation.registry import evaluator_names
from stas.evaluation.runner import prepare_evaluation
from stas.evaluation.scores import DIMENSIONS
from stas.evaluation.vbench import VBenchError, VBenchRunner, weights_report
from stas.rundir import check_writable, describe_differences, differing_keys, identity, load_identity, read_yaml
from stas.loggers import RunLogger

TOOL = "stas.evaluate"
RUN_OVERRIDES = Path(".hydra") / "overrides.yaml"
WEIGHTS_FLAG = "--vbench-weights"
# What an evaluation sets itself; the run's own values of these are not carried over.
EVALUATION_KEYS = ("eval", "logger", "shard", "progress")


def evaluation_config(run_dir: Path, overrides: list[str]):
    """The run's config (its own overrides, checked against its identity) with this evaluation's settings."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such directory (give the run directory written by stas.run)")
    recorded, translated = upgrade_identity(load_identity(run_dir))
    run_overrides = [o for o in recorded_overrides(run_dir) if override_key(o) not in LEGACY_DETECTION_KEYS]
    given = {override_key(o) for o in overrides}
    kept = [o for o in run_overrides + translated
            if override_key(o) not in given and override_key(o).split(".")[0] not in EVALUATION_KEYS]
    cfg = compose_config(kept + overrides)
    keys = differing_keys(recorded, identity(cfg))
    if keys:
        raise ConfigError(f"{run_dir} holds a run of another config than these overrides give; differing keys: "
                          f"{describe_differences(recorded, identity(cfg), keys, names=('run', 'here'))}. "
                          f"Give overrides of {', '.join(EVALUATION_KEYS)} only (the rest comes from the run).")
    return cfg


# Runs made before the `detect` group (2026-11-26) recorded their detection as steer.ratio / steer.max_dims.
LEGACY_DETECTION_KEYS = ("steer.ratio", "steer.max_dims", "analysis.ratio", "analysis.max_dims")


def upgrade_identity(recorded: dict) -> tuple[dict, list[str]]:
    """A run identity from before the `detect` group, in today's keys, and the overrides that compose it: the
    channel-peak rule with the run's ratio and max_dims, and max_scaled's M from the steered channels, as they were.
    Scoring needs only the videos; the translation lets an older run's videos be evaluated."""
    steer = recorded.get("steer")
    if "detect" in recorded or not isinstance(steer, dict) or "ratio" not in steer:
        return recorded, []
    steer = dict(steer)
    ratio, max_dims = steer.pop("ratio"), steer.pop("max_dims", 4)
    steer.setdefault("reference", "steered")
    detect = {"rule": "channel_peak", "ratio": ratio, "floor": 0.0, "max_dims": max_dims, "branches": "per_branch"}
    overrides = ["detect=channel_peak", f"detect.ratio={ratio}", f"detect.max_dims={max_dims}",
                 f"steer.reference={steer['reference']}"]
    return {**recorded, "steer": steer, "detect": detect}, overrides


def recorded_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was made with (Hydra's .hydra/overrides.yaml: a list of strings)."""
    saved = run_dir / RUN_OVERRIDES
    if not saved.is_file():
        return []
    overrides = read_yaml(saved)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{saved} holds {repr(overrides)[:80]}; Hydra writes a list of override strings there "
                        "(e.g. ['model.steps=2'])")
    return overrides


def evaluate(run_dir: Path, overrides: list[str]):
    cfg = evaluation_config(run_dir, overrides)
    validate(cfg)
    if not cfg.eval.evaluators:
        raise ConfigError(f"eval.evaluators is empty (eval=none): name at least one of {', '.join(evaluator_names())}")
    check_writable(run_dir)
    evaluation = prepare_evaluation(cfg, run_dir)
    evaluation.plan()
    if not evaluation.has_work():  # everything that can run here has scored every video: no W&B run for nothing
        summary = evaluation.finish(logger=None)
        if summary.ran_anything:
            print(f"{TOOL}: nothing to evaluate: {summary.videos} video(s) already scored (no W&B run opened)")
        else:
            raise UserError(f"no evaluator could run:\n{summary}")
        return summary
    with RunLogger(cfg, run_dir, job_type="evaluate") as logger:
        summary = evaluation.run(logger)
    if not summary.ran_anything:
        raise UserError(f"no evaluator could run:\n{summary}")
    return summary


def vbench_weights(overrides: list[str]) -> str:
    """The weights helper: what each dimension of eval.vbench.dimensions needs in VBench's cache (composed like an
    evaluation's config: eval=vbench_standard for all 16), asked of VBench's own interpreter (eval.vbench.python)."""
    options = compose_config(overrides).eval.vbench
    unknown = [d for d in options.dimensions if d not in DIMENSIONS]
    if unknown or not options.dimensions:
        raise ConfigError(f"eval.vbench.dimensions={list(options.dimensions)}: name VBench dimensions, of "
                          f"{', '.join(DIMENSIONS)}")
    runner = VBenchRunner(options, "cpu", Path(tempfile.gettempdir()) / "stas-vbench-weights")
    try:
        return weights_report(runner.weights(list(options.dimensions)))
    except VBenchError as err:
        raise UserError(str(err)) from None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return
    if WEIGHTS_FLAG in args:
        try:
            print(vbench_weights([arg for arg in args if arg != WEIGHTS_FLAG]))
        except UserError as err:
            fail(TOOL, str(err))
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
