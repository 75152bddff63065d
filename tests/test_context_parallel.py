"""Context parallelism (model.parallel): the tiny Wan twins split over 2 ranks (torchrun, gloo, CPU, Ulysses attention)
give one process's frames, steering record and capture readout, bit for bit, through stas.generation's path and
through stas.apply_stas on the pipeline's own `pipe(...)`; one exception: the mean_abs detection
threshold is a float sum over the tokens, summed per rank and then across ranks, so it can differ from one process's
in the last bits (a relative 2e-7 here): it is compared within 1e-6 (with detect=channel_peak, exactly). The
thresholds only decide which channels count as massive; the channels found, the frames and the records are equal.

`test_a_local_maximum_changes_the_frames` runs STAS with the all-reduce MAX turned off (each rank steers toward its
own chunk's peak): the frames differ, so the comparison can fail. Ring attention cannot run here: diffusers' ring
attention needs an attention backend returning the log-sum-exp, and all of those are CUDA-only (see
stas.backbones.parallel); model.parallel.ring_degree refuses a CPU device.

Each case starts its processes afresh (diffusers' parallel state cannot be undone in a process): the cases that run
processes are in the full suite only (slow); the quick tier checks the refusals and the token split.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stas.backbones import BackboneError, load_pipeline
from stas.backbones.parallel import _check_plan, parallel_size, token_split
from stas.config import ConfigError, validate
from stas.core.parallel import WHOLE, SplitError, TokenSplit

from conftest import compose

WORKER = Path(__file__).parent / "parallel_worker.py"
THRESHOLD_RTOL = 1e-6


def run_worker(out: Path, twin: str, ranks: int, *flags: str) -> dict:
    """The worker's results: one process, or `ranks` under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    done = subprocess.run([*launcher, str(WORKER), str(out), twin, *flags], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


_single: dict = {}


def single_process(twin: str, tmp_path_factory) -> dict:
    if twin not in _single:
        _single[twin] = run_worker(tmp_path_factory.mktemp("single") / "out.pt", twin, 1)
    return _single[twin]


def assert_same(single: dict, split: dict) -> None:
    assert torch.equal(single["frames"], split["frames"])
    assert single["record"] == split["record"]
    for name, value in single["capture"].items():
        other = split["capture"][name]
        if name == "thresholds":
            torch.testing.assert_close(other, value, rtol=THRESHOLD_RTOL, atol=0, equal_nan=True)
        else:
            assert torch.equal(value.nan_to_num(-1.0), other.nan_to_num(-1.0)), name


@pytest.mark.slow  # each case starts torchrun and a one-process run: minutes on 2 busy cores
@pytest.mark.parametrize("twin", ["tiny_wan21", "tiny_wan22", "tiny_wan22_a14b"])  # a14b: two experts, both split
def test_two_ranks_give_one_process_outputs(twin, tmp_path, tmp_path_factory):
    single = single_process(twin, tmp_path_factory)
    split = run_worker(tmp_path / "split.pt", twin, 2)
    assert set(split) == set(single)
    for case in single:
        assert_same(single[case], split[case])
    # Not vacuous: the steered cases steered, and the channel_peak case's thresholds are exact.
    assert all(not torch.equal(single[case]["frames"], single["none"]["frames"]) for case in single if case != "none")
    assert all(single[case]["record"]["values_steered"] > 0 for case in single if case != "none")
    assert torch.equal(single["stas_channel_peak"]["capture"]["thresholds"],
                       split["stas_channel_peak"]["capture"]["thresholds"])


@pytest.mark.slow
def test_a_local_maximum_changes_the_frames(tmp_path, tmp_path_factory):
    single = single_process("tiny_wan21", tmp_path_factory)
    local = run_worker(tmp_path / "local.pt", "tiny_wan21", 2, "--local-max")
    assert set(local) == {"stas"}
    assert not torch.equal(local["stas"]["frames"], single["stas"]["frames"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regional", "hook"])  # hook: steer.compile_hook, the all-reduce in its graph
def test_two_ranks_compiled_recompile_nothing_after_the_warm_up(mode, tmp_path, tmp_path_factory):
    """model.compile=regional (or the steering hook compiled alone) under context parallelism: the second whole call
    compiles nothing more, breaks no more graphs, and gives eager one-process frames within float tolerance
    (inductor reorders float sums) and its record."""
    single = single_process("tiny_wan21", tmp_path_factory)["stas"]
    compiled = run_worker(tmp_path / "compiled.pt", "tiny_wan21", 2, f"--compile={mode}")
    warm, after = compiled["counts"]
    assert warm == after and warm["graphs"] > 0
    torch.testing.assert_close(compiled["stas"]["frames"], single["frames"], atol=5e-4, rtol=0)
    assert compiled["stas"]["record"] == single["record"]


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["model.group_offload=block_level", "model.layerwise_casting=float8_e4m3fn"])
def test_two_ranks_with_a_memory_option_give_one_process_outputs(setting, tmp_path, tmp_path_factory):
    """Context parallelism under group offloading (weights onloaded group by group on every rank) and float8
    storage: the frames, record and capture of one process with the same option, bit for bit. Group offloading
    changes nothing (its frames are those without it); float8 storage changes the video (so the comparison is not
    between equal videos by accident)."""
    single = run_worker(tmp_path / "single.pt", "tiny_wan21", 1, f"--set={setting}")
    split = run_worker(tmp_path / "split.pt", "tiny_wan21", 2, f"--set={setting}")
    assert set(split) == set(single) == {"stas"}
    assert_same(single["stas"], split["stas"])
    assert split["stas"]["record"]["values_steered"] > 0
    plain = single_process("tiny_wan21", tmp_path_factory)["stas"]["frames"]
    assert torch.equal(single["stas"]["frames"], plain) is setting.startswith("model.group_offload")


def run_dirs(root: Path) -> list[Path]:
    return sorted(path.parent for path in root.rglob("generation.jsonl"))


@pytest.mark.slow
def test_torchrun_stas_run_writes_one_run_with_one_process_videos(tmp_path):
    """The documented launch: `torchrun --nproc_per_node=2 -m stas.run ... model.parallel.ulysses_degree=2`. Rank 0
    writes the run (rank 1 leaves no directory), and its videos are one process's, byte for byte."""
    import json

    args = ["model.steps=4", "model.num_frames=9", "prompts.limit=2", "logger=none", "eval=none", "progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for root, launcher, extra in (
        (tmp_path / "split", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
         ["model.parallel.ulysses_degree=2"]),
        (tmp_path / "single", [sys.executable], []),
    ):
        root.mkdir()
        done = subprocess.run([*launcher, "-m", "stas.run", *args, *extra], cwd=root, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
    (split,), (single,) = run_dirs(tmp_path / "split"), run_dirs(tmp_path / "single")
    assert [path.name for path in (tmp_path / "split").rglob("*") if path.is_dir() and path.parent.name == "stas"] \
        == [split.name]  # one run directory: rank 1's own (if its clock gave another name) is gone

    def videos(run: Path) -> dict:
        rows = [json.loads(line) for line in (run / "generation.jsonl").read_text().splitlines()]
        return {row["key"]: ((run / row["path"]).read_bytes(), row["steering"]) for row in rows}

    assert videos(split) == videos(single) and len(videos(single)) == 2


# ------------------------------------------------------------------------------------------- refusals, in-process


@pytest.mark.parametrize("overrides, message", [
    (["model=tiny_cogvideox", "model.parallel.ulysses_degree=2"],
     r"cogvideox family \(CogVideoXTransformer3DModel\) has no context-parallel plan"),
    (["model=tiny_ltx", "model.parallel.ulysses_degree=2"],
     r"ltx family \(LTXVideoTransformer3DModel\) has no context-parallel plan in diffusers that stas supports"),
    (["model=tiny_wan21", "model.num_frames=9", "model.parallel.ulysses_degree=5"],
     r"splits the 72 video tokens .* into 5 equal chunks"),
    (["model=tiny_wan21", "model.parallel.ring_degree=2", "model.device=cpu"], r"ring_degree=2 needs CUDA"),
    (["model=wan21_1.3b", "model.parallel.ring_degree=2", "model.device=cuda", "model.dtype=float32"],
     r"ring_degree=2 with model.dtype=float32"),
    (["model=tiny_wan21", "model.parallel.ulysses_degree=2", "detect=sun"], r"detect.rule=sun cannot run with"),
    (["model=tiny_wan21", "model.parallel.ulysses_degree=0"], r"must be >= 1"),
    (["model=tiny_wan21", "model.parallel.ulysses_degree=2", "model.device=cuda:1"],
     r"model.device=cuda:1 with model.parallel: each rank runs on cuda:<LOCAL_RANK>"),
    (["model=tiny_wan21", "model.parallel.ulysses_degree=2", "model.parallel.attention_backend=fast"],
     r"attention_backend='fast' is not a diffusers attention backend; allowed: flash, "),
    (["model=tiny_wan21", "model.parallel.ulysses_degree=2", "guidance=enhance_a_video"],
     r"guidance=enhance_a_video cannot run with model.parallel: its temporal attention map"),
])
def test_parallel_options_that_cannot_run_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([*overrides, "logger=none"]))


def test_a_parallel_model_outside_torchrun_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cfg = compose(["model=tiny_wan21", "logger=none", "model.parallel.ulysses_degree=2"])
    with pytest.raises(BackboneError, match=r"launch with torchrun"):
        load_pipeline(cfg.model, validate(cfg))


def test_the_plan_check_refuses_a_transformer_without_a_plan_and_heads_ulysses_cannot_split(tiny_pipelines):
    _, backbone, pipe = tiny_pipelines["tiny_cogvideox"]
    with pytest.raises(BackboneError, match=r"no context-parallel plan"):
        _check_plan(pipe.transformer, backbone, 2)
    _, backbone, pipe = tiny_pipelines["tiny_wan21"]
    _check_plan(pipe.transformer, backbone, 2)  # 2 heads over 2 ranks
    with pytest.raises(BackboneError, match=r"ulysses_degree=4 must divide the 2 attention heads"):
        _check_plan(pipe.transformer, backbone, 4)
    assert token_split(backbone, pipe.transformer) is WHOLE  # not parallel: the whole sequence


def test_parallel_size_defaults_to_one_process():
    assert parallel_size(None) == 1
    assert parallel_size(compose(["logger=none"]).model.parallel) == 1


# --------------------------------------------------------------------------------------------------- TokenSplit


def test_token_split_spans_and_local_indices():
    split = TokenSplit(1, 2, group=object())
    assert split.span(72) == (36, 72) and split.local_tokens(72) == 36
    index = torch.tensor([0, 5, 35, 36, 40, 71])
    assert split.localize(index, 72).tolist() == [0, 4, 35]
    assert TokenSplit(0, 2, group=object()).localize(index, 72).tolist() == [0, 5, 35]
    assert torch.equal(split.local(torch.arange(72), 72, dim=0), torch.arange(36, 72))
    with pytest.raises(SplitError, match=r"71 video tokens do not split evenly across 2"):
        split.span(71)


def test_one_process_split_is_the_identity():
    tensor = torch.randn(2, 6)
    assert WHOLE.max(tensor) is tensor and WHOLE.sum(tensor) is tensor and WHOLE.gather(tensor, 1) is tensor
    assert WHOLE.localize(torch.arange(6), 6).tolist() == list(range(6))
    assert WHOLE.span(7) == (0, 7)
    with pytest.raises(ValueError, match="needs their process group"):
        TokenSplit(0, 2)
