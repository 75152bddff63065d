"""Prompt sources (demo list, text file, the VBench suite) and the (prompt, sample, seed) items of a run."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from stas.config import ConfigError

# File names stay below 255 bytes with room for "-NNN.mp4" and the temporary suffix.
MAX_STEM_BYTES = 230
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Item:
    """One video of a run: prompt `prompt_index` (0-based), sample `index` (VBench's 0-4), sampled with `seed`."""

    prompt_index: int
    prompt: str
    index: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.prompt_index}:{self.index}"

    @property
    def filename(self) -> str:
        return f"{safe_stem(self.prompt)}-{self.index}.mp4"

    def manifest_row(self) -> dict:
        return {"key": self.key, "prompt": self.prompt, "index": self.index, "seed": self.seed, "file": self.filename}


def safe_stem(prompt: str) -> str:
    """The prompt itself when it is a valid file name (VBench's standard mode needs exact names), else a cleaned,
    shortened name made unique by a hash of the full prompt."""
    if not _UNSAFE.search(prompt) and not prompt.startswith(".") and 0 < len(prompt.encode()) <= MAX_STEM_BYTES:
        return prompt
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:10]
    cleaned = _UNSAFE.sub("_", prompt).lstrip(".").strip() or "prompt"
    cleaned = cleaned.encode()[: MAX_STEM_BYTES - 12].decode(errors="ignore").rstrip()
    return f"{cleaned}~{digest}"


def vbench_info_path() -> Path:
    try:
        import vbench
    except ImportError:
        raise ConfigError(
            "prompts=vbench reads VBench_full_info.json from the vbench package, which is not installed: "
            "pip install --no-deps vbench==0.1.5 (see README, 'VBench')"
        ) from None
    return Path(vbench.__file__).parent / "VBench_full_info.json"


def load_prompts(cfg) -> list[str]:
    """The prompts a `prompts` config names, in order, without duplicates."""
    if cfg.source in ("demo", "list"):
        prompts = [str(p) for p in cfg.prompts]
    elif cfg.source == "file":
        path = Path(str(cfg.path))
        if not path.is_file():
            raise ConfigError(f"prompts.path={str(cfg.path)!r}: no such file (one prompt a line)")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        entries = json.loads((Path(cfg.path) if cfg.path else vbench_info_path()).read_text(encoding="utf-8"))
        wanted = set(cfg.vbench_dimensions or [])
        prompts = [e["prompt_en"] for e in entries if not wanted or wanted & set(e["dimension"])]
        if wanted and not prompts:
            raise ConfigError(f"prompts.vbench_dimensions={sorted(wanted)} matches no VBench prompt")
    prompts = list(dict.fromkeys(prompts))
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if not prompts:
        where = f" in {cfg.path}" if cfg.source == "file" else ""
        raise ConfigError(f"prompts ({cfg.source}) is empty{where}: give at least one prompt")
    return prompts


def make_items(prompts: list[str], samples_per_prompt: int, seed: int) -> list[Item]:
    """Every (prompt, sample) of a run; sample i of every prompt uses seed + i, so runs pair up by seed."""
    items = [Item(p, prompt, i, seed + i) for p, prompt in enumerate(prompts) for i in range(samples_per_prompt)]
    names: dict[str, Item] = {}
    for item in items:
        if item.filename in names:
            raise ConfigError(
                f"prompts {names[item.filename].prompt!r} and {item.prompt!r} map to the same file name {item.filename!r}"
            )
        names[item.filename] = item
    return items


def shard_items(items: list[Item], index: int, count: int) -> list[Item]:
    """Shard `index` of `count`: every count-th item, so shards are balanced and deterministic."""
    return items[index::count]
