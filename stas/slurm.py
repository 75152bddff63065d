"""`python -m stas.slurm [--shards K] [--dry-run] OVERRIDES...`: submit an experiment as chained sbatch arrays.

Every cell of the experiment's grid (the sweep in its `hydra.sweeper.params` and any comma-separated override)
becomes one run directory and three dependent jobs that need no waiting launcher process:

    generate  (array of K shards)  ->  evaluate (array of K shards, afterok)  ->  merge (one job, afterok)

and one `tables` job after every cell's merge. Cluster settings (partition, account, GPUs, CPUs, memory, time,
array parallelism, setup lines) come from conf/hydra/launcher/slurm.yaml, overridable as hydra.launcher.<key>=...
The run directories are the ones `python -m stas.run -m ...` would use, so both paths can resume each other.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from stas.cli import compose_config, override_key
from stas.config import ConfigError, path_safe, validate
from stas.errors import UserError
from stas.paths import REPO_DIR
from stas.rundir import atomic_write_text

SCRIPTS_DIR = REPO_DIR / "slurm"
STAGES = ("generate", "evaluate", "merge")


@dataclass
class Cell:
    """One grid point: its overrides and its run directory."""

    overrides: list[str]
    run_dir: Path

    @property
    def label(self) -> str:
        return self.run_dir.name


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # Hydra's grammar errors carry a readable message
        raise UserError(f"cannot parse overrides {overrides}: {err}") from None


def expand_grid(overrides: list[str]) -> tuple[list[list[str]], object]:
    """Every cell's override list, and the config of the first cell (for the sweep dir and cluster settings).

    Command-line sweeps (a=x,y) and the experiment's hydra.sweeper.params both expand, the command line winning for
    a key given in both (Hydra's rule).
    """
    parsed = _parse(overrides)
    shard_keys = [o.input_line for o in parsed if o.get_key_element().startswith("shard.")]
    if shard_keys:
        raise UserError(f"{shard_keys[0]}: shards are set by --shards (one array task per shard)")
    # As Hydra's sweeper writes them (a\ cat), so that the cells' directories are the ones a multirun uses
    fixed = [f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed if not o.is_sweep_override()]
    base = compose_config(fixed, with_hydra=True)
    sweeps = {o.get_key_element(): o for o in parsed if o.is_sweep_override()}
    params = base.hydra.sweeper.params
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    for key, value in params.items():
        if key not in sweeps:
            sweeps[key] = _parse([f"{key}={value}"])[0]
    axes = [[f"{key}={v}" for v in override.sweep_string_iterator()] if override.is_sweep_override()
            else [override.input_line] for key, override in sweeps.items()]
    return [fixed + list(choice) for choice in itertools.product(*axes)], base


def task_overrides(overrides: list[str]) -> list[str]:
    """The overrides a job itself gets (Hydra's own `hydra...` overrides only shape the submission)."""
    return [o for o in overrides if not override_key(o).startswith("hydra")]


def run_dir_of(cell_overrides: list[str], cfg, sweep_dir: Path | None = None) -> Path:
    """The directory Hydra's multirun gives this cell: sweep dir / override_dirname (minus the excluded keys).
    `sweep_dir`: the sweep's, resolved once (an unnamed sweep's has the time in it)."""
    exclude = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    kept = sorted(o for o in task_overrides(cell_overrides) if override_key(o) not in exclude)
    return Path(sweep_dir or str(cfg.hydra.sweep.dir)) / path_safe(",".join(kept))


def plan(overrides: list[str]) -> tuple[list[Cell], object]:
    cells, base = expand_grid(overrides)
    sweep_dir = Path(str(base.hydra.sweep.dir))
    planned = []
    for cell_overrides in cells:
        cfg = compose_config(cell_overrides, with_hydra=True)
        try:
            validate(cfg)
        except ConfigError as err:
            raise UserError(f"cell {' '.join(cell_overrides)}: {err}") from None
        planned.append(Cell(cell_overrides, run_dir_of(cell_overrides, cfg, sweep_dir).resolve()))
    return planned, base


def sbatch_options(launcher, gpus: bool = True) -> list[str]:
    """sbatch flags from the slurm launcher config (the keys hydra-submitit-launcher uses); merge and tables
    jobs ask for no GPU."""
    flags = {
        "partition": launcher.get("partition"),
        "account": launcher.get("account"),
        "qos": launcher.get("qos"),
        "constraint": launcher.get("constraint"),
        "nodes": launcher.get("nodes"),
        "ntasks-per-node": launcher.get("tasks_per_node"),
        "gpus-per-node": (launcher.get("gpus_per_node") or None) if gpus else None,
        "cpus-per-task": launcher.get("cpus_per_task"),
        "mem": f"{launcher.mem_gb}G" if launcher.get("mem_gb") else None,
        "time": launcher.get("timeout_min"),
    }
    flags.update(launcher.get("additional_parameters") or {})
    return [f"--{key.replace('_', '-')}={value}" for key, value in flags.items() if value is not None]


def commands(cells: list[Cell], base, shards: int) -> list[tuple[str, list[str], str | None]]:
    """(step name, sbatch argv, dependency placeholder) in submission order; '{name}' stands for a job id."""
    launcher = base.hydra.launcher
    options, cpu_options = sbatch_options(launcher), sbatch_options(launcher, gpus=False)
    parallel = launcher.get("array_parallelism") or shards
    array = f"--array=0-{shards - 1}%{parallel}"
    planned = []
    for n, cell in enumerate(cells):
        logs = cell.run_dir / "slurm"
        previous = None
        for stage in STAGES:
            name = f"{stage}{n}"
            argv = ["sbatch", "--parsable", f"--job-name=stas-{stage}", *(cpu_options if stage == "merge" else options)]
            if stage != "merge":
                argv += [array, f"--output={logs}/{stage}-%A_%a.out"]
            else:
                argv += [f"--output={logs}/{stage}-%j.out"]
            if previous:
                argv.append(f"--dependency=afterok:{{{previous}}}")
            argv += [str(SCRIPTS_DIR / f"{stage}.sbatch"), str(cell.run_dir)]
            planned.append((name, argv, previous))
            previous = name
    sweep_dir = Path(str(base.hydra.sweep.dir)).resolve()
    merges = ":".join(f"{{merge{n}}}" for n in range(len(cells)))
    planned.append(("tables", ["sbatch", "--parsable", "--job-name=stas-tables", *cpu_options,
                               f"--output={sweep_dir}/tables-%j.out", f"--dependency=afterok:{merges}",
                               str(SCRIPTS_DIR / "tables.sbatch"), str(sweep_dir)], None))
    return planned


def write_cell_files(cell: Cell, launcher) -> None:
    """What the sbatch scripts read: the cell's overrides (one a line) and the environment setup."""
    slurm_dir = cell.run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(slurm_dir / "overrides.txt", "\n".join(task_overrides(cell.overrides)) + "\n")
    setup = [f"export STAS_REPO={shlex.quote(str(REPO_DIR))}", *(launcher.get("setup") or [])]
    atomic_write_text(slurm_dir / "setup.sh", "\n".join(setup) + "\n")


def submit(overrides: list[str], shards: int, dry_run: bool, out=sys.stdout) -> dict:
    if shards < 1:
        raise UserError(f"--shards={shards} must be >= 1")
    if not dry_run and shutil.which("sbatch") is None:  # before anything is written into a run directory
        raise UserError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run to see what "
                        "would be submitted)")
    if not any(o.split("=", 1)[0] == "hydra/launcher" for o in overrides):
        overrides = [*overrides, "hydra/launcher=slurm"]
    cells, base = plan(overrides)
    planned = commands(cells, base, shards)
    print(f"stas.slurm: {len(cells)} run(s) x {shards} shard(s): "
          f"{len(planned)} sbatch submissions{' (dry run: nothing written or submitted)' if dry_run else ''}",
          file=out)
    for cell in cells:
        print(f"  run {cell.run_dir}\n      overrides: {' '.join(cell.overrides)}", file=out)
    ids: dict[str, str] = {}
    for name, argv, _ in planned:
        shown = [arg.format(**ids) if ids else arg for arg in argv]
        print("  " + shlex.join(shown), file=out)
        if dry_run:
            continue
        if name.startswith("generate"):
            write_cell_files(cells[int(name[len("generate"):])], base.hydra.launcher)
        try:
            result = subprocess.run(shown, capture_output=True, text=True, check=True)
        except FileNotFoundError:
            raise UserError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run)") from None
        except subprocess.CalledProcessError as err:
            raise UserError(f"sbatch failed for {name} ({err.returncode}): {err.stderr.strip()}") from None
        ids[name] = result.stdout.strip().split(";")[0]
        print(f"    -> job {ids[name]}", file=out)
    record = {"cells": [{"run_dir": str(c.run_dir), "overrides": c.overrides} for c in cells], "jobs": ids}
    if not dry_run:
        sweep_dir = Path(str(base.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "slurm_submission.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stas.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1, help="array tasks per stage and run (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=paper_main")
    args = parser.parse_args(argv)
    try:
        submit(args.overrides, args.shards, args.dry_run)
    except UserError as err:
        print(f"stas.slurm: error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
