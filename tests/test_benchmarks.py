"""The benchmark scripts run (--quick, toy sizes) and report what they promise; no timing is asserted."""

import json
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import capture_overhead  # noqa: E402
import framework_overhead  # noqa: E402
import memory_options  # noqa: E402
import peak_reduction  # noqa: E402
import steering_overhead  # noqa: E402
from bench_models import PRESETS  # noqa: E402
from timing import interleave  # noqa: E402

RATIO_LINE = re.compile(r"^overhead_ratio=(\d+\.\d+)$")


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_interleave_rotates_the_order_and_times_every_round():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = interleave(cases, repeats=4, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warmup round
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [len(t.seconds) for t in timings.values()] == [4, 4, 4]
    assert [len(t.cpu_seconds) for t in timings.values()] == [4, 4, 4]
    assert all(s >= 0 for t in timings.values() for s in t.seconds)


@pytest.mark.parametrize("model, dtype, calls_per_step", [
    ("tiny_wan21", "float32", 2 * 2),  # two-pass CFG: every block hooked on the cond call and the uncond call
    ("tiny_cogvideox", "bfloat16", 2 * 1),  # batched CFG: one call on [uncond, cond]
])
def test_steering_overhead_quick(tmp_path, capsys, model, dtype, calls_per_step):
    out = tmp_path / "steering.json"
    result = steering_overhead.main(["--quick", "--model", model, "--dtype", dtype, "--threads", "1",
                                     "--json", str(out)])
    text = capsys.readouterr().out
    match = RATIO_LINE.match(last_line(text))
    assert match and float(match.group(1)) == pytest.approx(result["in_window_ratio"], abs=1e-4)
    for heading in ("in-window: one denoising step", "whole run: 5 steps", "CFG + one extra forward pass",
                    "hook vs block"):
        assert heading in text
    saved = json.loads(out.read_text())
    assert saved["model"]["family"] == PRESETS[model].family
    for part, cases in (("in_window", {"vanilla", "stas", "extra_pass"}), ("whole_run", {"vanilla", "stas"})):
        assert set(saved[part]) == cases
        assert all(len(saved[part][case]["seconds"]) == 3 for case in cases)
    steer = saved["steer"]
    # The default window of 5 steps is [0, 2); auto-detection finds the three planted channels on every call.
    assert steer["window_steps"] == [0, 2]
    assert steer["record_in_window_step"]["hook_calls"] == calls_per_step
    assert steer["record_in_window_step"]["channels_mean"] == pytest.approx(3.0)
    assert steer["record_whole_run"]["steps"] == [0, 1]
    assert steer["record_whole_run"]["hook_calls"] == 2 * calls_per_step
    assert steer["steering_changed_latents"] is True


def test_memory_options_quick(tmp_path, capsys):
    """Group offloading leaves STAS's latents bit for bit those of the transformer on the device; float8 storage
    changes them (the difference this benchmark reports can be nonzero) and STAS steers as many values."""
    out = tmp_path / "memory.json"
    result = memory_options.main(["--quick", "--model", "tiny_wan21", "--threads", "1", "--json", str(out)])
    assert last_line(capsys.readouterr().out) == "offload_max_abs_diff=0.0"
    cases = json.loads(out.read_text())["cases"]
    assert list(cases) == ["none", "block_level", "leaf_level", "float8_e4m3fn"]  # no side stream on the CPU
    assert result["offload_max_abs_diff"] == 0.0 and cases["float8_e4m3fn"]["max_abs_diff_from_none"] > 0
    assert len({case["values_steered"] for case in cases.values()}) == 1 and cases["none"]["values_steered"] > 0


def test_memory_options_refuses_a_side_stream_on_the_cpu():
    with pytest.raises(SystemExit, match="block_level_stream needs --device cuda"):
        memory_options.main(["--quick", "--model", "tiny_wan21", "--cases", "block_level_stream"])


@pytest.mark.slow
@pytest.mark.parametrize("model, mode", [("tiny_wan21", "regional"), ("tiny_cogvideox", "full")])
def test_steering_overhead_compiled(tmp_path, capsys, model, mode):
    from stas.backbones import reset_compiler

    reset_compiler()
    out = tmp_path / "steering.json"
    steering_overhead.main(["--quick", "--model", model, "--compile", mode, "--threads", "1", "--json", str(out)])
    reset_compiler()
    assert f"torch.compile: {mode}; warm-up" in capsys.readouterr().out
    compiled = json.loads(out.read_text())["compile"]
    assert compiled["mode"] == mode
    assert compiled["warmup"]["graphs"] > 0 and compiled["warmup"]["graph_breaks"] == 0
    # Compiled once, vanilla and STAS alike: the timed rounds ran compiled code only.
    assert compiled["timed_rounds"] == {"graphs": 0, "recompiles": 0, "graph_breaks": 0}


def test_steering_overhead_rejects_a_window_too_short_to_steer(capsys):
    with pytest.raises(SystemExit, match="window is empty"):
        steering_overhead.main(["--quick", "--model", "tiny_wan21", "--steps", "1"])


def test_capture_overhead_quick(tmp_path, capsys):
    out = tmp_path / "capture.json"
    result = capture_overhead.main(["--quick", "--model", "tiny_wan21", "--steps", "2", "--rounds", "2",
                                    "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    match = RATIO_LINE.match(last_line(text))
    assert match and float(match.group(1)) == pytest.approx(result["overhead_ratio"], abs=1e-4)
    saved = json.loads(out.read_text())
    # stas.analyze's defaults on 2 blocks and 2 steps: everything captured, the middle block profiled at step 0.
    assert saved["capture"] == {"blocks": 2, "steps": 2, "branches": 2, "profile": [[1, 0]]}
    assert all(len(saved["runs"][case]["seconds"]) == 2 for case in ("vanilla", "capture"))
    # The buffers fill their documented bound exactly, far below one block output per captured observation.
    assert saved["buffer_bytes"] == saved["bound_bytes"] > 0
    assert saved["bound_bytes"] < 2 * 2 * 2 * saved["block_output_bytes"]


@pytest.mark.slow
def test_framework_overhead_quick(tmp_path, capsys):
    out = tmp_path / "framework.json"
    # --cli-runs 0: the default `python -m stas.run` alone takes ~15 s; the generation tests run that CLI already.
    result = framework_overhead.main(["--quick", "--threads", "1", "--video-rounds", "2", "--generation-rounds", "1",
                                      "--prompts", "2", "--cli-runs", "0", "--json", str(out)])
    text = capsys.readouterr().out
    match = RATIO_LINE.match(last_line(text))
    assert match and float(match.group(1)) == pytest.approx(result["per_video_ratio"], abs=1e-4)
    assert "per video, no mp4 on either side" in text and "generation of all 2 prompts" in text
    saved = json.loads(out.read_text())
    assert saved["same_frames"] is True  # stas.run's path and the direct call make the same video
    assert len(saved["per_video"]["stas"]["seconds"]) == 2 and len(saved["generation"]["direct"]["seconds"]) == 1
    assert saved["cli_seconds"] == [] and "end to end: skipped" in text


def test_peak_reduction_quick(capsys):
    result = peak_reduction.main(["--quick", "--shape", "2x96x32", "--threads", "1", "--calls", "2"])
    line = last_line(capsys.readouterr().out)
    assert re.match(r"^fastest=(\w+) channel_peaks_vs_fastest=(\d+\.\d+)$", line)
    assert result["fastest"] in peak_reduction.KERNELS
    assert set(result["ms_per_call"]) == {"channel_peaks", *peak_reduction.KERNELS}


@pytest.mark.parametrize("argv", [["--video", "17x384"], ["--video", "17x0x544"], ["--video", "big"]])
def test_bad_sizes_are_a_usage_error_naming_the_option(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        steering_overhead.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--video {argv[1]!r}: expected FRAMESxHEIGHTxWIDTH" in error


@pytest.mark.parametrize("script, argv, message", [
    (steering_overhead, ["--window-rounds", "0"], "argument --window-rounds: '0' is not an integer >= 1"),
    (steering_overhead, ["--threads", "two"], "argument --threads: 'two' is not an integer >= 1"),
    (capture_overhead, ["--steps", "0"], "argument --steps: '0' is not an integer >= 1"),
    (peak_reduction, ["--calls", "-3"], "argument --calls: '-3' is not an integer >= 1"),
    (framework_overhead, ["--cli-runs", "-1"], "argument --cli-runs: '-1' is not an integer >= 0"),
])
def test_bad_counts_are_a_usage_error_naming_the_option(capsys, script, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_framework_overhead_unknown_model_lists_the_options():
    with pytest.raises(SystemExit, match=r"--model nonexistent: .*Available options in 'model': .*tiny_wan21"):
        framework_overhead.main(["--quick", "--model", "nonexistent"])
