"""Shared by the scripts in benchmarks/: interleaved repetitions, medians and spreads, the machine, the report.

Every comparison runs its cases in one process, round after round, each case once per round and in an order that
rotates from round to round: slow drift of the machine (clock, other processes) then spreads over all cases instead
of biasing the one that happens to run last. Times are wall-clock; on CUDA the device is synchronised around each
timed call (outside the call, so that a case may forbid synchronisation inside it). The process's CPU time is kept
beside it: on a CPU shared with other processes the wall clock also counts the time they took, the CPU time of a
single-threaded run (--threads 1) does not.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Timings:
    """The wall-clock seconds of every timed repetition of one case."""

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # CPU time of this process (all its threads)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repetitions lie."""
        return (max(self.seconds) - min(self.seconds)) / self.median

    def ratio_to(self, baseline: "Timings") -> float:
        """Median over median: the cost of this case relative to the baseline."""
        return self.median / baseline.median

    def best_ratio_to(self, baseline: "Timings") -> float:
        """Fastest over fastest: where other processes only ever slow a run down, the least disturbed pair."""
        return min(self.seconds) / min(baseline.seconds)

    def paired_ratio_to(self, baseline: "Timings") -> float:
        """Median of the per-round ratios: robust to drift between rounds (both ran in the same round)."""
        return statistics.median(a / b for a, b in zip(self.seconds, baseline.seconds))

    def cpu_ratio_to(self, baseline: "Timings") -> float:
        """Median CPU time over the baseline's."""
        return statistics.median(self.cpu_seconds) / statistics.median(baseline.cpu_seconds)

    def ratios_to(self, baseline: "Timings") -> dict:
        """Every ratio to the baseline, for the JSON record."""
        return {"median": self.ratio_to(baseline), "paired": self.paired_ratio_to(baseline),
                "best": self.best_ratio_to(baseline), "cpu_time": self.cpu_ratio_to(baseline)}

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.seconds), "max_s": max(self.seconds),
                "seconds": self.seconds, "cpu_seconds": self.cpu_seconds}


def device_synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes a timer honest on `device`: wait for queued kernels on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleave(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
               synchronize: Callable[[], None] = lambda: None) -> dict[str, Timings]:
    """Time every case `repeats` times, interleaved (see the module docstring), after `warmup` untimed rounds
    (lazy initialisation, allocator, caches). Returns {case name: Timings} in the order of `cases`."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be >= 1")
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    timings = {name: Timings(name) for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            cases[name]()
            synchronize()
            timings[name].seconds.append(time.perf_counter() - start)
            timings[name].cpu_seconds.append(time.process_time() - cpu_start)
    return timings


@contextmanager
def cpu_threads(count: int | None):
    """torch's CPU thread count set to `count` inside (None: unchanged), restored after: a benchmark's main may
    run inside a test process."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def benchmark_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The command line every benchmark shares (--quick, --threads, --json), described by the script's docstring."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=at_least(1), help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    return parser


def run_benchmark(script: str, argv, args, measure: Callable, last_line: Callable[[dict], str]) -> dict:
    """What every benchmark's main does: `measure(args)` with --threads CPU threads, the command recorded, the
    result written to --json (if given), and `last_line(result)` printed last, for scripts and tests to read."""
    with cpu_threads(args.threads):
        result = measure(args)
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command.strip(), **result}
    if getattr(args, "json", None):
        from stas.rundir import atomic_write_json

        atomic_write_json(args.json, result)
    print(last_line(result))
    return result


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for counts: an integer >= `minimum` (argparse names the option in its message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value

    return parse


def sizes(option: str, names: str, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for sizes written 'AxBxC' (a video, a tensor shape); `names` says what A, B, C are."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in text.lower().split("x"))
        except ValueError:
            values = ()
        if len(values) != len(names.split("x")) or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{option} {text!r}: expected {names} (positive), e.g. {example}")
        return values

    return parse


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """Where the numbers come from; the load average tells whether other processes shared the CPU."""
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def table(rows: list[tuple[str, Timings]], baseline: Timings, cpu_time: bool = True) -> str:
    """A GitHub-markdown table of (label, timings) rows: median, spread, every repetition, and the ratios to
    `baseline`: of the medians (the headline), paired (median of per-round ratios), best (of the minima), and of
    the median CPU times if `cpu_time` (meaningless on CUDA, where the host only waits)."""
    from tabulate import tabulate

    lines = []
    for label, timings in rows:
        line = [label, f"{timings.median:.4f}", f"{100 * timings.spread:.1f}%", f"{timings.ratio_to(baseline):.4f}",
                f"{timings.paired_ratio_to(baseline):.4f}", f"{timings.best_ratio_to(baseline):.4f}"]
        if cpu_time:
            line.append(f"{timings.cpu_ratio_to(baseline):.4f}")
        lines.append(line + [" ".join(f"{s:.4f}" for s in timings.seconds)])
    headers = ["case", "median s", "spread", "ratio", "paired ratio", "best ratio"]
    headers += ["CPU-time ratio"] if cpu_time else []
    headers += ["all repetitions (wall s)"]
    return tabulate(lines, headers=headers, tablefmt="github", disable_numparse=True)
