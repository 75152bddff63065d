"""`python -m stas.analyze [overrides]`: measure massive activations, plot them, calibrate MA channels.

Examples:
    python -m stas.analyze                                   # tiny Wan twin, vanilla CFG, demo prompts
    python -m stas.analyze model=wan21_1.3b analysis.profile_layers=[15] analysis.profile_steps=[5]
    python -m stas.analyze steer=stas                        # steered next to vanilla in every output
    python -m stas.analyze analysis.compare=[runs/a/analyze-x,runs/b/analyze-y]   # side by side, no sampling

Outputs (run directory): ma_stats.pt, ma_summary.json, ma_dims.yaml, ma_*.png; see docs/analysis.md.
"""

from __future__ import annotations

from pathlib import Path

from stas.backbones import start_ranks
from stas.backbones.parallel import is_leader
from stas.cli import hydra_entry
from stas.config import validate
from stas.generation import run_items
from stas.ma.analysis import analyze as analyze_run
from stas.ma.compare import compare
from stas.rundir import check_writable
from stas.loggers import RunLogger


def analyze(cfg, run_dir: Path) -> None:
    if cfg.analysis.compare:
        check_writable(run_dir)
        table = compare(list(cfg.analysis.compare), run_dir)
        print(f"{table}\n\nstas.analyze: comparison written to {run_dir} (compare.md, compare.json, compare.png)")
        return
    backbone = validate(cfg)
    run_items(cfg)  # reads the prompts now, so a missing or empty prompt file fails before anything is written
    start_ranks(cfg.model)
    if not is_leader():  # model.parallel under torchrun: every rank samples and captures, rank 0 writes
        analyze_run(cfg, run_dir, backbone, logger=None)
        return
    check_writable(run_dir)
    with RunLogger(cfg, run_dir, job_type="analyze") as logger:
        result = analyze_run(cfg, run_dir, backbone, logger)
    print(f"stas.analyze: {cfg.model.name} / steer={cfg.steer.name if cfg.steer.enabled else 'none'}:\n{result}")


main = hydra_entry("stas.analyze", analyze, config_name="analyze")

if __name__ == "__main__":
    main()
