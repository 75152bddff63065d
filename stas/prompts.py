"""Prompt sources (demo list, text or JSON file, the VBench suite) and the (prompt, sample, seed) items of a run.

A prompt file may give an image per prompt (image-to-video backbones, e.g. Wan2.2-TI2V): `prompt<TAB>image path`
lines, or a `.json` file holding a list of {"prompt": ..., "image": ...} objects; image paths are relative to the
prompt file's folder. Each image is read and hashed (sha256) when the prompts are loaded, so a missing, unreadable
or changed image is known before anything is generated."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from stas.errors import ConfigError

# File names stay below 255 bytes with room for "-NNN.mp4" and the temporary suffix.
MAX_STEM_BYTES = 230
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


PROMPT_FILE_FORMATS = ("one prompt a line, optionally prompt<TAB>image path", 'a .json list of {"prompt": ..., '
                       '"image": ...} objects ("image" optional)')
JSON_KEYS = ("prompt", "image")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt set, with the image it starts from (image-to-video) or None: the path as the prompt
    file gives it (`image`), where it was found (`image_file`) and the sha256 of its bytes; `where` names the line or
    entry of the prompt file for messages."""

    text: str
    image: str | None = None
    image_file: str | None = None
    image_sha256: str | None = None
    where: str = ""

    @property
    def identity(self) -> tuple[str, str | None]:
        """What makes two prompts the same (a repeat is dropped): the text and the image's bytes."""
        return self.text, self.image_sha256


@dataclass(frozen=True)
class Item:
    """One video of a run: prompt `prompt_index` (0-based), sample `index` (VBench's 0-4), sampled with `seed`;
    `image`, `image_file`, `image_sha256` as in Prompt (None for a text-only prompt)."""

    prompt_index: int
    prompt: str
    index: int
    seed: int
    image: str | None = None
    image_file: str | None = None
    image_sha256: str | None = None

    @property
    def key(self) -> str:
        return f"{self.prompt_index}:{self.index}"

    @property
    def filename(self) -> str:
        return f"{safe_stem(self.prompt)}-{self.index}.mp4"

    def manifest_row(self) -> dict:
        row = {"key": self.key, "prompt": self.prompt, "index": self.index, "seed": self.seed, "file": self.filename}
        return {**row, **self.image_fields()}

    def image_fields(self) -> dict:
        """The image of a generation row or manifest row (none for a text-only prompt): its path as the prompt file
        gives it and its sha256, which makes the run reproducible and refuses a changed image on resume."""
        return {} if self.image is None else {"image": self.image, "image_sha256": self.image_sha256}


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
    """The prompt texts a `prompts` config names, in order, without duplicates (see load_prompt_set)."""
    return [prompt.text for prompt in load_prompt_set(cfg)]


def load_prompt_set(cfg) -> list[Prompt]:
    """The prompts a `prompts` config names, in order, without duplicates (the same text with the same image)."""
    if cfg.source in ("demo", "list"):
        prompts = [Prompt(str(p)) for p in cfg.prompts]
    elif cfg.source == "file":
        prompts = prompt_file(cfg.path)
    else:
        prompts = [Prompt(text) for text in vbench_prompts(cfg.path, set(cfg.vbench_dimensions or []),
                                                           cfg.per_dimension)]
        if cfg.vbench_dimensions and not prompts:
            raise ConfigError(f"prompts.vbench_dimensions={sorted(cfg.vbench_dimensions)} matches no VBench prompt")
    unique: dict[tuple, Prompt] = {}
    for prompt in prompts:
        unique.setdefault(prompt.identity, prompt)
    prompts = list(unique.values())
    check_one_image_per_prompt(prompts)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if not prompts:
        where = f" in {cfg.path}" if cfg.source == "file" else ""
        raise ConfigError(f"prompts ({cfg.source}) is empty{where}: give at least one prompt")
    return prompts


def check_one_image_per_prompt(prompts: list[Prompt]) -> None:
    """A ConfigError when one prompt text comes with two different images (or with and without one): videos are
    named, paired across runs and grouped by their prompt text (VBench's naming)."""
    first: dict[str, Prompt] = {}
    for prompt in prompts:
        other = first.setdefault(prompt.text, prompt)
        if other is not prompt:
            images = [f"image {p.image!r}" if p.image is not None else "no image" for p in (other, prompt)]
            raise ConfigError(f"{other.where} and {prompt.where.rpartition(': ')[2]} give the prompt {prompt.text!r} "
                              f"with {images[0]} and with {images[1]}; a prompt starts from one image (videos are "
                              "named and paired by their prompt): word the prompts apart")


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


def vbench_prompts(path, dimensions: set[str], per_dimension: int | None = None) -> list[str]:
    """The prompts of a VBench info file (default: VBench_full_info.json of the vbench package): a JSON list of
    objects with `prompt_en` and, to filter by `dimensions` or pick `per_dimension` prompts of each dimension (in
    the file's order, each prompt taken while one of its dimensions has fewer), `dimension` (a list of names)."""
    where = f"prompts.path={str(path)!r}" if path else "VBench_full_info.json"
    source = Path(str(path)) if path else vbench_info_path()
    entries = read_json(source, where, "a VBench info JSON: a list of objects with 'prompt_en'")
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: must be a JSON list of objects with 'prompt_en', not a {type(entries).__name__}")
    prompts, taken = [], defaultdict(set)  # per dimension, the distinct prompts taken (a prompt may repeat)
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt_en"), str):
            raise ConfigError(f"{where}: entry {number} must be an object with a string 'prompt_en', got "
                              f"{_shorten(entry)}")
        if dimensions or per_dimension:
            listed = entry.get("dimension")
            if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
                field = "prompts.vbench_dimensions" if dimensions else "prompts.per_dimension"
                raise ConfigError(f"{where}: entry {number} needs 'dimension', a list of VBench dimension names, for "
                                  f"{field}; got {_shorten(listed)}")
            wanted = dimensions & set(listed) if dimensions else set(listed)
            if not wanted or (per_dimension and all(len(taken[name]) >= per_dimension for name in wanted)):
                continue
            for name in wanted:
                taken[name].add(entry["prompt_en"])
        prompts.append(entry["prompt_en"])
    return prompts


def read_json(source: Path, where: str, expected: str):
    """The JSON value of a file; a ConfigError naming `where` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(source.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file ({expected})") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: is not UTF-8 text (byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None


# ------------------------------------------------------------------------------- prompt files with images


def prompt_file(path) -> list[Prompt]:
    """The prompts of a prompt file: a `.json` list of {"prompt", "image"} objects, else one prompt a line
    (blank lines skipped), `prompt<TAB>image path` where the prompt starts from an image."""
    if Path(str(path)).suffix.lower() == ".json":
        return json_prompt_file(path)
    prompts = []
    for number, line in enumerate(prompt_lines(path), start=1):
        where = f"prompts.path={str(path)!r}: line {number}"
        text, _, image = line.partition("\t")
        text, image = text.strip(), image.strip()
        if "\t" in image:
            raise ConfigError(f"{where} has {line.count(chr(9))} tabs; the format is {PROMPT_FILE_FORMATS[0]} "
                              "(one tab, between the prompt and the image path)")
        if not image:  # no tab, or nothing after it
            if text:
                prompts.append(Prompt(text, where=where))
            continue
        if not text:
            raise ConfigError(f"{where} gives an image ({image!r}) but no prompt before the tab; the format is "
                              f"{PROMPT_FILE_FORMATS[0]}")
        prompts.append(image_prompt(text, image, path, where))
    return prompts


def json_prompt_file(path) -> list[Prompt]:
    """The prompts of a JSON prompt file: a list of objects with a string "prompt" and, optionally, "image"."""
    entries = read_json(Path(str(path)), f"prompts.path={str(path)!r}", f"a prompt file: {PROMPT_FILE_FORMATS[1]}")
    if not isinstance(entries, list):
        raise ConfigError(f"prompts.path={str(path)!r}: must be a JSON list of objects with \"prompt\" and, "
                          f"optionally, \"image\", not a {type(entries).__name__}")
    prompts = []
    for number, entry in enumerate(entries):
        where = f"prompts.path={str(path)!r}: entry {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ConfigError(f"{where} must be an object with a non-empty string \"prompt\" (and, optionally, "
                              f"an \"image\" path), got {_shorten(entry)}")
        unknown = sorted(set(entry) - set(JSON_KEYS))
        if unknown:
            raise ConfigError(f"{where} has key(s) {', '.join(map(repr, unknown))}; allowed: "
                              f"{', '.join(map(repr, JSON_KEYS))}")
        image = entry.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            raise ConfigError(f"{where}: \"image\" must be a path (a non-empty string) or null, got "
                              f"{_shorten(image)}")
        text = entry["prompt"].strip()
        prompts.append(Prompt(text, where=where) if image is None else image_prompt(text, image.strip(), path, where))
    return prompts


def image_prompt(text: str, image: str, prompt_path, where: str) -> Prompt:
    """A prompt with its image, read, checked to be an image and hashed; the image path is relative to the prompt
    file's folder (or absolute)."""
    from PIL import Image, UnidentifiedImageError

    file = Path(image).expanduser()
    if not file.is_absolute():
        file = Path(str(prompt_path)).parent / file
    about = f"{where}: image {image!r} ({file})"
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{about}: no such file; image paths are relative to the prompt file's folder, or "
                          "absolute") from None
    except OSError as err:
        raise ConfigError(f"{about}: cannot be read: {err.strerror or err}") from None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ConfigError(f"{about}: is not an image Pillow can read (PNG, JPEG, WebP, ...): {err}") from None
    return Prompt(text, image, str(file), hashlib.sha256(data).hexdigest(), where)


def _shorten(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_items(prompts: list[Prompt | str], samples_per_prompt: int, seed: int) -> list[Item]:
    """Every (prompt, sample) of a run; sample i of every prompt uses seed + i, so runs pair up by seed."""
    prompts = [prompt if isinstance(prompt, Prompt) else Prompt(prompt) for prompt in prompts]
    items = [Item(p, prompt.text, i, seed + i, prompt.image, prompt.image_file, prompt.image_sha256)
             for p, prompt in enumerate(prompts) for i in range(samples_per_prompt)]
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
