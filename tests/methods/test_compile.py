"""torch.compile (model.compile=regional|full) with STAS, the analysis capture and the twins' planted MAs, on CPU.

Each compiled case builds its own twin (compiling changes the transformer for good), runs a whole pipeline call to
warm up (every graph compiles there), then a second whole call, and checks with dynamo's counters
(stas.backbones.compile_counts) that nothing recompiled, before or after the warm-up, that no graph broke, and that
the frames, steering record and capture readout are eager mode's (within float tolerance: inductor fuses and
reorders float operations). `test_the_recompile_check_catches_a_host_step_counter` shows the check failing on a
hook that reads the host step counter, as STAS's hooks did before.

CogVideoX's transformer declares no `_repeated_blocks` in diffusers 0.42, so model.compile=regional refuses it; the
`blocks` cases compile its blocks the way regional compilation does, to check the hooks in per-block graphs of the
family whose blocks return a tuple.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
import torch._dynamo

from stas.backbones import BackboneError, compile_counts, compile_transformer, load_pipeline, reset_compiler
from stas.config import ConfigError, validate
from stas.core.layout import TokenLayout
from stas.core.selection import analysis_selection
from stas.generation import make_loop, make_steerer, run_pipeline
from stas.ma.capture import MACapture
from stas.methods.hooks import BlockHooks
from stas.prompts import Item
from stas.core.massive import Detection

from conftest import compose

ITEM = Item(0, "a red fox runs through fresh snow", 0, 7)
STEPS = 4  # the default window [0, 0.4) steers steps 0 and 1: steered and unsteered steps in every run
ATOL = 5e-4  # frames are in [0, 1] (a uint8 level is 4e-3); compiled vs eager differ by ~1e-6 (Wan) to ~2e-4 (CogVideoX) here


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts from an empty compile cache and zeroed counters, and leaves none behind."""
    reset_compiler()
    yield
    reset_compiler()


def build(model: str, compile_mode: str, *overrides: str):
    """A freshly built twin, compiled as model.compile says ("blocks": each transformer block compiled)."""
    cfg = compose([f"model={model}", "logger=none", f"model.steps={STEPS}",
                   f"model.compile={'none' if compile_mode == 'blocks' else compile_mode}", *overrides])
    backbone = validate(cfg)
    pipe = load_pipeline(cfg.model, backbone)
    pipe.set_progress_bar_config(disable=True)
    if compile_mode == "blocks":
        for block in backbone.blocks(pipe.transformer):
            block.compile()
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    return cfg, backbone, pipe, layout


def generate(built, runs: int, check=None) -> list[dict]:
    """`runs` whole sampling calls (stas's own loop) with the config's steering attached once (as stas.generation
    does): frames, steering record and the compile counters after each call."""
    cfg, backbone, pipe, layout = built
    kwargs = backbone.pipeline_kwargs(cfg.model)
    steerer, loop = make_steerer(cfg, backbone), make_loop(cfg, backbone)
    results = []
    with ExitStack() as stack:
        if steerer is not None:
            stack.enter_context(steerer.attach(pipe.transformer))
        for _ in range(runs):
            frames = np.asarray(run_pipeline(pipe, ITEM, kwargs, steerer, layout, loop).frames[0])
            results.append({"frames": frames, "record": steerer.record() if steerer else None,
                            "counts": compile_counts()})
    return results


def assert_compiled_like_eager(eager: dict, warm: dict, second: dict, warmup_recompiles: int = 0) -> None:
    assert warm["counts"]["graphs"] > 0, "nothing was compiled"
    assert warm["counts"]["recompiles"] == warmup_recompiles, warm["counts"]
    assert second["counts"] == warm["counts"], "the second run compiled again or broke a graph"
    assert second["counts"]["graph_breaks"] == 0
    for result in (warm, second):
        np.testing.assert_allclose(result["frames"], eager["frames"], rtol=0, atol=ATOL)
        assert result["record"] == eager["record"]


@pytest.mark.parametrize("model, mode", [
    ("tiny_wan21", "regional"),
    pytest.param("tiny_wan21", "full", marks=pytest.mark.slow),
    pytest.param("tiny_cogvideox", "full", marks=pytest.mark.slow),
    pytest.param("tiny_cogvideox", "blocks", marks=pytest.mark.slow),
    pytest.param("tiny_ltx", "regional", marks=pytest.mark.slow),
    pytest.param("tiny_ltx", "full", marks=pytest.mark.slow),
    pytest.param("tiny_hunyuanvideo", "regional", marks=pytest.mark.slow),  # two block classes, two graphs
])
def test_compiled_stas_equals_eager_without_recompiles(model, mode):
    eager_vanilla = generate(build(model, "none", "steer=none"), 1)[0]
    eager = generate(build(model, "none"), 1)[0]
    assert np.abs(eager["frames"] - eager_vanilla["frames"]).max() > 20 * ATOL  # STAS changes this video, well above ATOL
    assert eager["record"]["values_steered"] > 0 and eager["record"]["steps"] == [0, 1]
    warm, second = generate(build(model, mode), 2)
    # CogVideoX's first block gets a strided view of the patch embedding (text and video tokens in one tensor), the
    # others contiguous outputs: its compiled blocks recompile once for that stride, with or without hooks. Likewise
    # HunyuanVideo's single-stream blocks: the first gets the double-stream blocks' contiguous output, the others a
    # view of [video, text] split on return, so the single block, its planter and its steering hook each compile
    # once more for that stride while warming up (TORCH_LOGS=recompiles: "stride mismatch at index 0").
    warmup_recompiles = {"blocks": 1}.get(mode, 3 if model == "tiny_hunyuanvideo" else 0)
    assert_compiled_like_eager(eager, warm, second, warmup_recompiles=warmup_recompiles)


@pytest.mark.parametrize("model, overrides", [
    ("tiny_wan21", ()),
    pytest.param("tiny_cogvideox", (), marks=pytest.mark.slow),  # batched CFG: both branches in one call
    pytest.param("tiny_wan21", ("steer.dims=[5,17]", "steer.branches=uncond"), marks=pytest.mark.slow),
    pytest.param("tiny_wan21", ("detect.branches=shared",), marks=pytest.mark.slow),
])
def test_compiled_steering_hook_on_an_eager_transformer_equals_eager(model, overrides):
    """steer.compile_hook: only the steering hook is compiled (one graph for every block, both branches, and the
    calls outside the window, which the eager check before it skips); the transformer and its planter stay eager."""
    eager = generate(build(model, "none", *overrides), 1)[0]
    warm, second = generate(build(model, "none", "steer.compile_hook=true", *overrides), 2)
    assert_compiled_like_eager(eager, warm, second)
    assert warm["counts"]["graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("steer.dims=[5,17]", "steer.branches=uncond", "steer.rule=per_channel_max"),  # fixed channels, one branch
    ("steer=zero_ma", "steer.layers=[1]"),
])
def test_compiled_stas_options_equal_eager(overrides):
    eager = generate(build("tiny_wan21", "none", *overrides), 1)[0]
    warm, second = generate(build("tiny_wan21", "regional", *overrides), 2)
    assert_compiled_like_eager(eager, warm, second)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", ["slg", "enhance_a_video"])
def test_compiled_guidance_methods_with_stas_equal_eager(guidance):
    """The perturbed pass (diffusers' layer-skip hooks on and off per call) and Enhance-A-Video's attention hook
    compile too: a graph or two more while warming up (a skipped block, an enhanced attention), none after it."""
    eager = generate(build("tiny_wan21", "none", f"guidance={guidance}"), 1)[0]
    warm, second = generate(build("tiny_wan21", "regional", f"guidance={guidance}"), 2)
    assert_compiled_like_eager(eager, warm, second, warmup_recompiles=warm["counts"]["recompiles"])
    assert warm["counts"]["recompiles"] <= 2


@pytest.mark.slow
def test_compiled_twin_without_steering_equals_eager():
    """The planted MAs alone (the planter's hooks) compile to one graph per frame and never recompile."""
    eager = generate(build("tiny_cogvideox", "none", "steer=none"), 1)[0]
    warm, second = generate(build("tiny_cogvideox", "full", "steer=none"), 2)
    assert_compiled_like_eager(eager, warm, second)


def capture_runs(built, runs: int) -> list[dict]:
    """stas.analyze's sampling: STAS attached first, then the capture; latents only."""
    cfg, backbone, pipe, layout = built
    kwargs = {**backbone.pipeline_kwargs(cfg.model), "output_type": "latent"}
    selection = analysis_selection(cfg.analysis, backbone.num_layers, cfg.model.steps)
    capture = MACapture(backbone, selection, Detection.of(cfg.detect), cfg.steer.boundary_width,
                        cfg.steer.boundary_unit)
    steerer = make_steerer(cfg, backbone)
    results = []
    with steerer.attach(pipe.transformer), capture.attach(pipe.transformer):
        for _ in range(runs):
            capture.begin(layout, cfg.model.steps, backbone.uses_cfg(kwargs))
            run_pipeline(pipe, ITEM, kwargs, steerer, layout)
            readout = capture.read()
            results.append({"readout": readout, "record": steerer.record(), "counts": compile_counts()})
    return results


@pytest.mark.parametrize("model, mode", [
    ("tiny_wan21", "regional"),
    pytest.param("tiny_cogvideox", "full", marks=pytest.mark.slow),
])
def test_compiled_capture_equals_eager_without_recompiles(model, mode):
    eager = capture_runs(build(model, "none"), 1)[0]
    warm, second = capture_runs(build(model, mode), 2)
    assert warm["counts"]["graphs"] > 0 and warm["counts"]["recompiles"] == 0, warm["counts"]
    assert second["counts"] == warm["counts"] and second["counts"]["graph_breaks"] == 0
    for result in (warm, second):
        assert result["record"] == eager["record"]
        for name in ("peaks", "regions", "tokens"):
            expected, got = getattr(eager["readout"], name), getattr(result["readout"], name)
            assert not torch.isnan(expected[..., 0]).any()  # every slot was written...
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, equal_nan=True)  # ...and compiled too


class HostStepHook:
    """What a naive steering hook does: branch on the host's step counter (STAS's hooks did before)."""

    def __init__(self, tracker):
        self.tracker = tracker

    def __call__(self, block, args, output):
        if self.tracker.step < 2:
            output.mul_(1.0)
        return None


def test_the_recompile_check_catches_a_host_step_counter():
    """The counters this file relies on do see a recompile: a hook reading the host step counter recompiles when
    the step changes. Dynamo alone (backend="eager") is enough for guards and recompiles, and fast."""
    cfg, backbone, pipe, layout = build("tiny_wan21", "none", "steer=none")
    compile_transformer(pipe.transformer, "regional", backend="eager")
    hooks = BlockHooks(backbone)
    kwargs = backbone.pipeline_kwargs(cfg.model)
    with hooks.attached(pipe.transformer, {0: HostStepHook(hooks.tracker)}):
        hooks.tracker.begin(layout, STEPS, do_cfg=True)
        run_pipeline(pipe, ITEM, kwargs, None, layout)
    assert compile_counts()["recompiles"] >= 1
    reset_compiler()
    with hooks.attached(pipe.transformer, {0: HostStepHook(hooks.tracker)}):
        hooks.tracker.begin(layout, STEPS, do_cfg=True)
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="[Rr]ecompil"):
            run_pipeline(pipe, ITEM, kwargs, None, layout)


def test_model_compile_is_validated():
    with pytest.raises(ConfigError, match=r"model\.compile='fast' is not allowed; allowed: none, regional, full"):
        validate(compose(["model=tiny_wan21", "logger=none", "model.compile=fast"]))
    with pytest.raises(ConfigError, match="cannot be combined with model.cpu_offload=sequential"):
        validate(compose(["model=tiny_wan21", "logger=none", "model.compile=full", "model.cpu_offload=sequential"]))


def test_regional_needs_repeated_blocks():
    cfg = compose(["model=tiny_cogvideox", "logger=none", "model.compile=regional"])
    with pytest.raises(BackboneError, match="CogVideoXTransformer3DModel declares no `_repeated_blocks`.*"
                                            "use model.compile=full"):
        load_pipeline(cfg.model, validate(cfg))
