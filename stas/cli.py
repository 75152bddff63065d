"""Shared plumbing of the Hydra entry points: config registration, the run directory, clean errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.experimental.callback import Callback
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stas.backbones.parallel import is_leader
from stas.config import ConfigError, check_override, config_groups, register_configs, validate_paths
from stas.errors import UserError
from stas.local_jobs import print_pending
from stas.paths import CONF_DIR
from stas.rundir import RunDirGuard, check_writable, remove_empty_parents

# Registered on import too: a submitit job process unpickles the task function (importing this module) and then
# resolves the sweep's subdir, which uses the path_safe resolver.
register_configs()


def fail(tool: str, message: str, code: int = 2):
    print(f"{tool}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


MULTIRUN_FILE = "multirun.yaml"  # a sweep's config, in its sweep directory
# The run directory this process made (single runs): {absolute run dir: the topmost folder made for it}.
MADE_HERE: dict[Path, Path] = {}


class OutputDirCheck(Callback):
    """Checks paths.root and creates the output directory before Hydra does, checking it can be written (a re-run
    into a read-only run directory), so that an unwritable one is a message, not a traceback, before Hydra writes
    anything. Notes which folders it made, so that a run that fails before making anything leaves none; a sweep's
    multirun.yaml is written before its first job."""

    def on_run_start(self, config, **kwargs) -> None:
        self._make(config, config.hydra.run.dir, "hydra.run.dir", note=True)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._make(config, config.hydra.sweep.dir, "hydra.sweep.dir")
        # The sweep's record, before any job runs, so that it stays when a job fails: Hydra's basic sweeper writes
        # the same file again; the Optuna sweeper (hydra/sweeper=search) writes none of its own.
        OmegaConf.save(config, Path(str(config.hydra.sweep.dir)) / MULTIRUN_FILE)

    @staticmethod
    def _make(config, directory: str, key: str, note: bool = False) -> None:
        path = Path(os.path.abspath(directory))
        missing = [folder for folder in (path, *path.parents) if not folder.exists()]
        try:
            if "paths" in config:
                validate_paths(config.paths)
            check_writable(path)
        except UserError as err:
            fail("stas", str(err) if isinstance(err, ConfigError) else f"{key}={err}")
        if note and missing:
            MADE_HERE[path] = missing[-1]


def run_in(run_dir: Path, task: Callable[[], Any]) -> Any:
    """Run `task` in `run_dir` and return what it returns; when it fails (an error, a kill by Ctrl-C) before the run
    made anything of its own, the directory Hydra made for it goes (stas.rundir.cleanup says what counts; a directory
    other processes work in, or one that held anything before, stays)."""
    made = MADE_HERE.get(Path(os.path.abspath(run_dir)))
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    log_name = f"{HydraConfig.get().job.name}.log" if HydraConfig.initialized() else ""
    guard = RunDirGuard(run_dir, log_name, made_here=made is not None or multirun)
    finished = False
    try:
        result = task()
        finished = True
        return result
    finally:
        # Silently: the error says what went wrong, and the directory held nothing but what this process made. A
        # context-parallel rank other than 0 writes nothing: its own directory goes too (rank 0's is not a stub).
        if (not finished or not is_leader()) and guard.remove_if_stub() and made is not None:
            remove_empty_parents(run_dir, made)
        guard.close()


def compose_config(overrides=(), with_hydra: bool = False, config_name: str = "config") -> DictConfig:
    """The config the CLIs compose from these overrides, outside a Hydra app (with the `hydra` node if asked;
    config_name="analyze" is stas.analyze's primary config); bad overrides are ConfigErrors."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    check_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(str(err))) from None


def _one_line(message: str) -> str:
    """Hydra's multi-line message as one line, without its config search path:
    "Could not find 'eval/x'. Available options in 'eval': default, none"."""
    lines = [line.strip() for line in message.split("Config search path")[0].splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].endswith(":"):
        return f"{lines[0]}. {lines[1]} {', '.join(lines[2:])}"
    return " ".join(lines)


def check_overrides(overrides) -> None:
    """Refuse an override of a key that is not a field or a value its field cannot hold, before Hydra composes (see
    `check_override`); what Hydra cannot parse is left to its own message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return
    groups = config_groups()
    for override in parsed:
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or override.package is not None:
            continue
        if override.is_delete():
            values = []
        elif override.is_sweep_override():
            try:
                values = list(override.sweep_iterator())
            except HydraException:  # interval and glob sweeps are enumerated only by the sweeper
                values = None
        else:
            values = [override.value()]
        check_override(key, values, groups)


def override_key(override: str) -> str:
    """The config key a command-line override sets ('model' for model=x, 'steer.alpha' for +steer.alpha=2)."""
    return override.split("=", 1)[0].lstrip("+~")


def hydra_entry(tool: str, task: Callable, config_name: str = "config") -> Callable[[], None]:
    """A console entry point running `task(cfg, run_dir)` under Hydra with the stas config tree; what the task
    returns is the job's return value, which a sweeper that optimises (Optuna) reads.

    `config_name` is the primary config in conf/ (config.yaml; analyze.yaml for stas.analyze).

    The command line's overrides are checked against the schema before Hydra composes (`check_overrides`: a key
    that is not a field or a value of the wrong type). A UserError becomes one line on stderr and exit code 2 (in a
    multirun too: a sweep with a bad value stops at the first job that has it, before that job writes anything;
    the sweep directory keeps its multirun.yaml).
    """

    def task_function(cfg):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        return run_in(run_dir, lambda: checked_task(cfg, run_dir))

    def checked_task(cfg, run_dir: Path):
        # Hydra saves the config with interpolations unresolved; keep the resolved one, which is what ran.
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
        try:
            return task(cfg, run_dir)
        except UserError as err:
            job = f" (job {HydraConfig.get().job.num})" if HydraConfig.get().mode == RunMode.MULTIRUN else ""
            fail(tool + job, str(err))

    hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task_function)

    def main() -> None:
        from hydra._internal.utils import get_args_parser  # the parser hydra.main itself reads sys.argv with

        args, _ = get_args_parser().parse_known_args()
        try:
            check_overrides(args.overrides)
        except ConfigError as err:
            fail(tool, str(err))
        try:
            hydra_main()
        finally:
            print_pending()  # the output of submitit_local jobs, also when one failed

    return main
