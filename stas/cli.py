"""Shared plumbing of the Hydra entry points: config registration, the run directory, clean errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.experimental.callback import Callback
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from stas.backbones import CONF_DIR
from stas.config import register_configs
from stas.errors import UserError


def fail(tool: str, message: str, code: int = 2):
    print(f"{tool}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class OutputDirCheck(Callback):
    """Creates the output directory before Hydra does, so that an unwritable one is a message, not a traceback."""

    def on_run_start(self, config, **kwargs) -> None:
        self._make(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._make(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _make(directory: str, key: str) -> None:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            fail("stas", f"{key}={directory!r}: the output directory cannot be created: {err.strerror or err}")


def compose(overrides=()):
    """A config composed exactly as the CLIs compose it (same tree, same schemas), for tests and benchmarks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def hydra_entry(tool: str, task: Callable) -> Callable[[], None]:
    """A console entry point running `task(cfg, run_dir)` under Hydra with the stas config tree.

    A UserError becomes one line on stderr and exit code 2 (in a multirun too: a sweep with a bad value stops
    at the first job that has it, before that job writes anything).
    """

    def task_function(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        # Hydra saves the config with interpolations unresolved; keep the resolved one, which is what ran.
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
        try:
            task(cfg, run_dir)
        except UserError as err:
            job = f" (job {HydraConfig.get().job.num})" if HydraConfig.get().mode == RunMode.MULTIRUN else ""
            fail(tool + job, str(err))

    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task_function)

    def entry() -> None:
        register_configs()
        main()

    return entry
