"""A run's identity (the config keys that decide what it produces), recorded once and checked on every re-run."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import OmegaConf

from stas.errors import ConfigError, UserError
from stas.paths import CONF_DIR
from stas.rundir.files import (atomic_write_bytes, atomic_write_text, create_exclusive, jsonl_text, own_file, read_yaml,
                               yaml_text)
from stas.rundir.records import MANIFEST_FILE, read_jsonl

IDENTITY_FILE = "run_identity.yaml"
HYDRA_DIR = ".hydra"
# Hydra writes .hydra/ before any stas code runs, also in a process that claim_run_dir then refuses: the runs that
# hold the directory keep their files here too, and a refused process puts them back.
HELD_HYDRA_DIR = f"{HYDRA_DIR}/held"
# Keys that change where or how fast a run goes, not what it produces.
NOT_IDENTITY = ("shard", "logger", "progress", "eval", "analysis", "search", "experiment", "name", "paths",
                "model.device", "model.cpu_offload", "model.vae_tiling", "model.vae_slicing", "model.compile",
                "model.group_offload", "model.group_offload_blocks", "model.group_offload_stream",
                "model.parallel", "steer.compile_hook")
# Config groups added after runs were recorded -> the option (conf/<group>/<option>.yaml) older runs ran as: before
# the guidance group stas.run sampled with pipe(...), whose frames guidance=cfg gives bit for bit (stas.loop).
ADDED_GROUPS = {"guidance": "cfg"}
# Config keys added after runs were recorded -> the value older runs ran with.
ADDED_KEYS = {"guidance.match_nfe": False}


def identity(cfg) -> dict:
    """The part of a resolved config that decides what a run produces."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for dotted in NOT_IDENTITY:
        node, *rest = dotted.split(".")
        if rest:
            data.get(node, {}).pop(rest[0], None)
        else:
            data.pop(node, None)
    return data


def flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def differing_keys(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<absent>") != fb.get(k, "<absent>"))


def describe_differences(a: dict, b: dict, keys: Iterable[str], names=("existing", "new")) -> str:
    fa, fb = flatten(a), flatten(b)
    return "; ".join(f"{k}: {names[0]}={fa.get(k, '<absent>')!r}, {names[1]}={fb.get(k, '<absent>')!r}" for k in keys)


def load_identity(run_dir: Path) -> dict:
    """The run's identity (run_identity.yaml, plain YAML: no tags); a UserError when it is missing or malformed."""
    path = own_file(run_dir, IDENTITY_FILE)
    if not path.is_file():
        raise UserError(f"{run_dir} is not a stas run directory (no {IDENTITY_FILE}; stas.run writes it)")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not the mapping of config keys stas.run writes")
    data = {**{group: read_yaml(CONF_DIR / group / f"{option}.yaml") for group, option in ADDED_GROUPS.items()},
            **data}
    for dotted, value in ADDED_KEYS.items():
        node, key = dotted.split(".")
        if isinstance(data.get(node), dict):
            data[node].setdefault(key, value)
    return data


def hydra_job(run_dir: Path) -> tuple[dict[str, str] | None, int | None]:
    """What Hydra recorded of how the run was composed: the config-group choices (hydra.runtime.choices, e.g.
    {"steer": "stas", "steer/window": "all"}; groups chose nothing left out) and the multirun job number
    (hydra.job.num; None outside a multirun). Read from .hydra/held/hydra.yaml (the run's own copy) or
    .hydra/hydra.yaml; (None, None) when neither exists, a UserError naming the file when it is not Hydra's shape."""
    for relative in (f"{HELD_HYDRA_DIR}/hydra.yaml", f"{HYDRA_DIR}/hydra.yaml"):
        path = own_file(run_dir, relative)
        if path.is_file():
            break
    else:
        return None, None
    data = read_yaml(path)
    hydra = data.get("hydra") if isinstance(data, dict) else None
    hydra = hydra if isinstance(hydra, dict) else {}
    runtime = hydra.get("runtime") if isinstance(hydra.get("runtime"), dict) else {}
    choices = runtime.get("choices")
    if not isinstance(choices, dict) or not all(isinstance(key, str) and (value is None or isinstance(value, str))
                                                for key, value in choices.items()):
        raise UserError(f"{path} has no hydra.runtime.choices mapping of config groups to options: is it the "
                        "hydra.yaml Hydra writes?")
    num = hydra["job"].get("num") if isinstance(hydra.get("job"), dict) else None
    return {key: value for key, value in choices.items() if value is not None}, num if type(num) is int else None


def claim_run_dir(run_dir: Path, cfg, manifest: list[dict]) -> None:
    """Record the run's identity and item manifest, or check that the run that recorded them had the same ones
    (same config, same prompts): outputs of different experiments never mix.

    Both files are created exclusively, so of processes started at once into one directory with different
    configs, exactly one proceeds; the others get the refusal a later run would get, and leave the directory's
    .hydra files as the run that holds it wrote them."""
    try:
        _check_or_record(run_dir, cfg, manifest)
    except ConfigError:
        held = run_dir / HELD_HYDRA_DIR
        for path in sorted(held.glob("*.yaml")) if held.is_dir() else []:
            atomic_write_bytes(run_dir / HYDRA_DIR / path.name, path.read_bytes())
        raise
    for name, text in _hydra_files(cfg).items():  # this run's own, in case a refused one overwrote them meanwhile
        atomic_write_text(run_dir / HELD_HYDRA_DIR / name, text)
        atomic_write_text(run_dir / HYDRA_DIR / name, text)


def _check_or_record(run_dir: Path, cfg, manifest: list[dict]) -> None:
    mine = identity(cfg)
    if not create_exclusive(run_dir / IDENTITY_FILE, yaml_text(mine).encode("utf-8")):
        theirs = load_identity(run_dir)
        keys = differing_keys(theirs, mine)
        if keys:
            raise ConfigError(
                f"{run_dir} already holds a run with another config; refusing to mix them. Differing keys: "
                + describe_differences(theirs, mine, keys)
                + ". Use a new hydra.run.dir, or the same overrides as before."
            )
    if (not create_exclusive(run_dir / MANIFEST_FILE, jsonl_text(manifest).encode("utf-8"))
            and read_jsonl(run_dir / MANIFEST_FILE) != manifest):
        raise ConfigError(f"{run_dir} was started with other prompts (its {MANIFEST_FILE} differs): "
                          "did the prompt file, or one of its images, change? Use a new hydra.run.dir.")


def _hydra_files(cfg) -> dict[str, str]:
    """The .hydra files of this process's run, as Hydra and stas.cli write them; none outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.instance().cfg
    return {"config.yaml": OmegaConf.to_yaml(cfg, resolve=True), "hydra.yaml": OmegaConf.to_yaml(hydra),
            # stas.evaluate composes the run's config from these: written so that they read back exactly
            "overrides.yaml": yaml_text(list(hydra.hydra.overrides.task))}
