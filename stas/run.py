"""`python -m stas.run [overrides]`: generate videos with CFG (+ STAS by default) into a run directory.

Examples:
    python -m stas.run                                     # tiny Wan twin, STAS, demo prompts, CPU, offline,
                                                           # then eval=default (what runs offline; says what not)
    python -m stas.run model=cogvideox5b steer.targets=boundary
    python -m stas.run -m steer=none,stas model=tiny_wan21,tiny_cogvideox
    python -m stas.run -m experiment=tiny_search           # an Optuna search (pip install -e '.[search]')

With `search.metric` set, a run returns that metric of its metrics.json: the objective of a hyperparameter search
(`hydra/sweeper=search`, Hydra's Optuna sweeper); otherwise it returns nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from stas.backbones import start_ranks
from stas.backbones.parallel import is_leader
from stas.cli import hydra_entry
from stas.config import ConfigError, validate
from stas.errors import UserError
from stas.evaluation import evaluate_run
from stas.evaluation.records import AGGREGATE_FILE, aggregate_value
from stas.generation import follow, generate, run_items
from stas.rundir import check_writable, claim_run_dir
from stas.loggers import RunLogger


def run(cfg, run_dir: Path) -> float | None:
    backbone = validate(cfg)
    check_search(cfg)
    items = run_items(cfg)  # reads the prompts now: a missing or empty prompt file fails before anything is written
    start_ranks(cfg.model)
    if not is_leader():  # model.parallel under torchrun: rank 0 writes the run, the others sample with it
        follow(cfg, backbone)
        return None
    check_writable(run_dir)
    claim_run_dir(run_dir, cfg, [item.manifest_row() for item in items])
    with RunLogger(cfg, run_dir, job_type="generate") as logger:
        summary = generate(cfg, run_dir, backbone, logger)
        logger.summary({"videos": summary.generated + summary.skipped,
                        "seconds_per_video": summary.seconds_per_video})
        print(f"stas.run: {cfg.model.name} / steer={cfg.steer.name}: {summary}")
        if cfg.eval.evaluators:
            print(f"stas.run: {evaluate_run(cfg, run_dir, logger)}")
        value = search_objective(cfg, run_dir)
        if value is not None:
            logger.summary({"search/objective": value})
            print(f"stas.run: search.metric {cfg.search.metric} = {value!r} (to {cfg.search.direction})")
    return value


def check_search(cfg) -> None:
    """A sweeper that optimises what runs return (Optuna) needs search.metric: without one every trial would run
    and then fail to report anything."""
    if cfg.search.metric is None and HydraConfig.initialized():
        target = str(HydraConfig.get().sweeper.get("_target_", ""))
        if "optuna" in target.lower():
            raise ConfigError(f"the sweeper ({target}) optimises what each run returns: set search.metric=<evaluator/"
                              "metric of metrics.json>, e.g. search.metric=pixel/consistency with pixel in "
                              "eval.evaluators")


def search_objective(cfg, run_dir: Path) -> float | None:
    """search.metric of the run's metrics.json (None without one); a UserError naming the metric and the metrics
    there when it is missing."""
    if cfg.search.metric is None:
        return None
    path = run_dir / AGGREGATE_FILE
    try:
        aggregate = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"search.metric={cfg.search.metric!r}: cannot read {path} ({err})") from None
    return aggregate_value(aggregate, cfg.search.metric, str(path))


main = hydra_entry("stas.run", run)

if __name__ == "__main__":
    main()
