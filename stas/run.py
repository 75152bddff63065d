"""`python -m stas.run [overrides]`: generate videos with CFG (+ STAS by default) into a run directory.

Examples:
    python -m stas.run                                     # tiny Wan twin, STAS, demo prompts, CPU, offline,
                                                           # then eval=default (what runs offline; says what not)
    python -m stas.run model=cogvideox5b steer.targets=boundary
    python -m stas.run -m steer=none,stas model=tiny_wan21,tiny_cogvideox
"""

from __future__ import annotations

from pathlib import Path

from stas.cli import hydra_entry
from stas.config import validate
from stas.evaluation import evaluate_run
from stas.generation import generate, run_items
from stas.rundir import check_writable, claim_run_dir
from stas.loggers import RunLogger


def run(cfg, run_dir: Path) -> None:
    backbone = validate(cfg)
    items = run_items(cfg)  # reads the prompts now: a missing or empty prompt file fails before anything is written
    check_writable(run_dir)
    claim_run_dir(run_dir, cfg, [item.manifest_row() for item in items])
    with RunLogger(cfg, run_dir, job_type="generate") as logger:
        summary = generate(cfg, run_dir, backbone, logger)
        logger.summary({"videos": summary.generated + summary.skipped,
                        "seconds_per_video": summary.seconds_per_video})
        print(f"stas.run: {cfg.model.name} / steer={cfg.steer.name}: {summary}")
        if cfg.eval.evaluators:
            print(f"stas.run: {evaluate_run(cfg, run_dir, logger)}")


main = hydra_entry("stas.run", run)

if __name__ == "__main__":
    main()
