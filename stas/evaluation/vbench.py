"""Driving the real VBench: one dimension per process, through `vbench_worker.py`, in a configurable interpreter.

VBench's install pins clash with this stack, so it may live in its own environment (eval.vbench.python). The worker
needs only the standard library and vbench; it first reports what each dimension lacks (weights in VBench's cache,
packages), so that a dimension that cannot run is skipped with a message saying how to fix it, before VBench would
start a download that hangs offline. Each runnable dimension then runs in its own process on a folder of links to the
videos it still has to score.

Two environments: the dimensions whose VBench code does not run beside eval.vbench.python's packages (human_action,
scene beside numpy 2 / transformers 5) go to eval.vbench.separate_python, a separate environment with VBench's own
pins (stas.evaluation.vbench_env makes one), when it is set; the probe asks each environment about the dimensions it
would run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stas.errors import UserError
from stas.evaluation.records import Video
from stas.evaluation.vbench_worker import HUB_DIMENSIONS
from stas.hub import hub_reachable

WORKER = Path(__file__).with_name("vbench_worker.py")
SAMPLES_PER_PROMPT = 5  # VBench's standard suite: {prompt}-{0..4}.mp4
CLIP_FORMAT = ("clip_model/*.pt must be OpenAI's release files from the URLs above (TorchScript archives): "
               "openai-clip's clip.load tries torch.jit.load first; its fallback for a plain state-dict file fails "
               "under torch 2.14 with a bare `EOFError:`.")


class VBenchError(UserError):
    """A dimension (or VBench as a whole) that could not run; the message says why and what to do."""


@dataclass(frozen=True)
class Route:
    """Where a dimension runs: the interpreter, whether it is the separate environment, and what is missing there
    (None: nothing)."""

    python: str
    separate: bool
    problems: str | None

    def describe(self) -> str:
        where = f"separate VBench environment {self.python}" if self.separate else self.python
        return f"runs in {where}: " + ("ready" if self.problems is None else self.problems)


class VBenchRunner:
    """The worker processes of one evaluation: a probe for all dimensions, then one process per dimension."""

    def __init__(self, options, device: str, logs_dir: Path):
        self.options = options
        self.python = options.python or sys.executable
        self.separate_python = options.separate_python
        self.routes: dict[str, Route] = {}
        self.device = device
        self.logs_dir = logs_dir
        self.env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
        if options.cache_dir:
            self.env["VBENCH_CACHE_DIR"] = str(Path(options.cache_dir).expanduser())
        self.full_info: str | None = options.full_info

    def _run(self, request: dict, log_name: str, timeout: float | None, env: dict | None = None,
             python: str | None = None) -> dict:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{log_name}.log"
        python = python or self.python
        with tempfile.TemporaryDirectory(prefix="stas-vbench-") as tmp:
            request = dict(request, output=str(Path(tmp) / "answer.json"))
            request_path = Path(tmp) / "request.json"
            request_path.write_text(json.dumps(request), encoding="utf-8")
            with open(log_path, "w", encoding="utf-8") as log:
                try:
                    process = subprocess.run([python, str(WORKER), str(request_path)], stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or self.env,
                                             timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise VBenchError(f"timed out after {timeout} s (eval.vbench.timeout); log: {log_path}") from None
                except OSError as err:
                    field = "separate_python" if python == self.separate_python else "python"
                    raise VBenchError(f"eval.vbench.{field}={python!r} cannot be run: "
                                      f"{err.strerror or err}") from None
            answer_path = Path(request["output"])
            if not answer_path.is_file():
                raise VBenchError(f"the VBench worker ({python}) exited with code {process.returncode} "
                                  f"without an answer; log: {log_path}")
            answer = json.loads(answer_path.read_text(encoding="utf-8"))
        if "traceback" in answer:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(answer["traceback"])
        if "error" in answer:
            raise VBenchError(f"{answer['error']} (log: {log_path})")
        return answer

    def probe(self, dimensions: list[str]) -> dict[str, str | None]:
        """{dimension: None when it can run, else why not and how to fix it}, each asked of the environment that
        will run it (`routes`)."""
        return {dimension: route.problems for dimension, route in self.plan(dimensions).items()}

    def plan(self, dimensions: list[str]) -> dict[str, Route]:
        """Where each dimension runs and what it lacks there: in eval.vbench.python, or, for a dimension whose
        packages are too new there (or all of them, when VBench is not installed there), in
        eval.vbench.separate_python when it is set. VBenchError: VBench cannot run in the environment asked."""
        try:
            answer = self._probe(self.python, dimensions, "probe")
        except VBenchError:
            if not self.separate_python:
                raise
            answer = None  # VBench is not installed beside stas: the separate environment runs everything
        moved = dimensions if answer is None else [d for d in dimensions if answer["dimensions"][d]["incompatible"]]
        separate, failure = None, None
        if moved and self.separate_python:
            try:
                separate = self._probe(self.separate_python, moved, "probe-separate")
            except VBenchError as err:  # only the dimensions meant for it are affected
                failure = f"the separate VBench environment cannot run them: {err}"
        for dimension in dimensions:
            if failure and dimension in moved:
                self.routes[dimension] = Route(self.separate_python, True, failure)
                continue
            source = separate if separate is not None and dimension in moved else answer
            self.routes[dimension] = Route(source["python"], source is separate, problems_message(
                source["dimensions"][dimension], source["cache_dir"], source["python"]))
        return {dimension: self.routes[dimension] for dimension in dimensions}

    def _probe(self, python: str, dimensions: list[str], log_name: str) -> dict:
        answer = self._run({"action": "probe", "dimensions": dimensions}, log_name, timeout=120, python=python)
        self.full_info = self.full_info or answer["full_info"]
        return answer

    def standard_videos(self, dimension: str) -> set[str]:
        """The file names VBench's standard mode scores for a dimension: {prompt}-{index}.mp4 of its prompts."""
        entries = json.loads(Path(self.full_info).read_text(encoding="utf-8"))
        return {f"{e['prompt_en']}-{i}.mp4" for e in entries if dimension in e["dimension"]
                for i in range(SAMPLES_PER_PROMPT)}

    def evaluate(self, dimension: str, videos: list[Video], log_name: str) -> dict:
        """VBench's answer for one dimension on `videos`: its value (None when no video has one), its per-video
        results `videos` [{video, value, weight}], and `left_out`: why a video without a result has none (color: no
        object detected), or None when that is an error."""
        with tempfile.TemporaryDirectory(prefix=f"stas-vbench-{dimension}-") as tmp:
            videos_dir = Path(tmp) / "videos"
            videos_dir.mkdir()
            for video in videos:
                (videos_dir / video.name).symlink_to(video.path.resolve())
            answer = self._run({
                "action": "evaluate",
                "dimension": dimension,
                "mode": self.options.mode,
                "videos_dir": str(videos_dir),
                "work_dir": str(Path(tmp) / "vbench"),
                "device": self.device,
                "full_info": self.full_info,
                "prompts": {video.name: video.prompt for video in videos},
            }, log_name, timeout=self.options.timeout, env=self.process_env(dimension),
                python=self.routes[dimension].python if dimension in self.routes else None)
        return answer

    def process_env(self, dimension: str) -> dict:
        """The environment of a dimension's process: HF_HUB_OFFLINE=1 for those that load a hub tokenizer when the hub
        cannot be reached (and the user set nothing), so they read the HF cache at once instead of retrying."""
        if dimension in HUB_DIMENSIONS and "HF_HUB_OFFLINE" not in self.env and not hub_reachable():
            return {**self.env, "HF_HUB_OFFLINE": "1"}
        return self.env

    def weights(self, dimensions: list[str]) -> dict:
        """Every file each dimension needs (the worker's `weights` action): path, source, whether present."""
        return self._run({"action": "weights", "dimensions": dimensions}, "weights", timeout=300)


def problems_message(entry: dict, cache_dir: str, python: str) -> str | None:
    """None when nothing is missing; else a first line saying what is missing, then each file's source and how to
    place it."""
    files, packages, incompatible = entry["missing_files"], entry["missing_packages"], entry.get("incompatible")
    parts = []
    if files:
        parts.append(f"{len(files)} weight file(s) missing from the VBench cache {cache_dir} "
                     "(VBENCH_CACHE_DIR or eval.vbench.cache_dir)")
    if packages:
        parts.append(f"package(s) missing in {python}: {', '.join(packages)}")
    if incompatible:
        parts.append(f"package(s) too new in {python}: {'; '.join(incompatible)}; run this dimension with VBench's "
                     "own pins in a separate environment (python -m stas.evaluation.vbench_env PATH, then "
                     "eval.vbench.separate_python=PATH/bin/python; docs/evaluation.md)")
    if not parts:
        return None
    lines = ["; ".join(parts)]
    for item in files:
        lines += [f"  {item['path']}", f"      from {item['source']}", f"      e.g. {item['how']}"]
    return "\n".join(lines)


def weights_report(answer: dict) -> str:
    """The weights helper's listing: per dimension, each file (relative to the cache when inside it), present or
    missing, its source, who declares it, and for a missing one how to place it."""
    cache = Path(answer["cache_dir"])
    lines = [f"VBench weights for {len(answer['dimensions'])} dimension(s); cache {cache} (VBENCH_CACHE_DIR or "
             f"eval.vbench.cache_dir); VBench's Python {answer['python']}"]
    missing = 0
    for dimension, files in answer["dimensions"].items():
        present = sum(entry["present"] for entry in files)
        lines.append(f"{dimension}: " + (f"{present} of {len(files)} present" if files else "needs no file"))
        for entry in files:
            path = Path(entry["path"])
            shown = entry["path"]
            if cache in path.parents:
                shown = str(path.relative_to(cache)) + ("/" if entry["path"].endswith("/") else "")
            lines.append(f"  {'present' if entry['present'] else 'MISSING':<8} {shown}")
            lines.append(f"           from {entry['source']} (declared by {entry['declared_by']})")
            if "copied_from" in entry:
                lines.append(f"           copied now from {entry['copied_from']}")
            if not entry["present"]:
                missing += 1
                lines.append(f"           e.g. {entry['how']}")
    lines.append(f"{missing} file(s) missing" if missing else "every file is present")
    if any("clip_model/" in entry["path"] for files in answer["dimensions"].values() for entry in files):
        lines.append(f"note: {CLIP_FORMAT}")
    return "\n".join(lines)
