"""Prompt sources (demo list, text file, the VBench suite) and the (prompt, sample, seed) items of a run."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from stas.errors import ConfigError

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
        prompts = [line.strip() for line in prompt_lines(cfg.path) if line.strip()]
    else:
        prompts = vbench_prompts(cfg.path, set(cfg.vbench_dimensions or []))
        if cfg.vbench_dimensions and not prompts:
            raise ConfigError(f"prompts.vbench_dimensions={sorted(cfg.vbench_dimensions)} matches no VBench prompt")
    prompts = list(dict.fromkeys(prompts))
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if not prompts:
        where = f" in {cfg.path}" if cfg.source == "file" else ""
        raise ConfigError(f"prompts ({cfg.source}) is empty{where}: give at least one prompt")
    return prompts


def prompt_lines(path) -> list[str]:
    """The lines of a prompt file, split on newlines only: U+2028, U+0085 and the other separators that
    str.splitlines also splits on stay inside their prompt."""
    where = f"prompts.path={str(path)!r}"
    try:
        data = Path(str(path)).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (one prompt a line)") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot be read: {err.strerror or err}") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{where}: line {number} is not UTF-8 text (byte {raw[err.start]:#04x} at column "
                              f"{err.start + 1}); save the file as UTF-8") from None
    return lines


def vbench_prompts(path, dimensions: set[str]) -> list[str]:
    """The prompts of a VBench info file (default: VBench_full_info.json of the vbench package): a JSON list of
    objects with `prompt_en` and, to filter by `dimensions`, `dimension` (a list of names)."""
    where = f"prompts.path={str(path)!r}" if path else "VBench_full_info.json"
    source = Path(str(path)) if path else vbench_info_path()
    try:
        entries = json.loads(source.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (a VBench info JSON: a list of objects with 'prompt_en')") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: is not UTF-8 text (byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: must be a JSON list of objects with 'prompt_en', not a {type(entries).__name__}")
    prompts = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt_en"), str):
            raise ConfigError(f"{where}: entry {number} must be an object with a string 'prompt_en', got "
                              f"{_shorten(entry)}")
        if dimensions:
            listed = entry.get("dimension")
            if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
                raise ConfigError(f"{where}: entry {number} needs 'dimension', a list of VBench dimension names, to "
                                  f"filter by prompts.vbench_dimensions; got {_shorten(listed)}")
            if not dimensions & set(listed):
                continue
        prompts.append(entry["prompt_en"])
    return prompts


def _shorten(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
