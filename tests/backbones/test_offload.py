"""The transformer's memory options (model.group_offload, model.layerwise_casting) with STAS and the analysis
capture on the tiny twins, on CPU.

diffusers' group offloading and layerwise casting are HookRegistry hooks wrapping module forwards; STAS's and the
capture's are torch hooks of `_call_impl`, outside those wrappers. Group offloading only moves weights (on CPU the
onload device is the CPU itself, so what is checked here is that the hooks compose, not the transfers): frames,
steering record and capture readout are bit for bit those without it. float8 storage changes the weights, so the
video changes; STAS must still steer it, through the same hook calls.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from stas.backbones import load_pipeline
from stas.config import ConfigError, validate
from stas.core.layout import TokenLayout
from stas.core.selection import analysis_selection
from stas.generation import make_loop, make_steerer, run_pipeline
from stas.ma.capture import MACapture
from stas.prompts import Item
from stas.rundir.run_identity import identity
from stas.core.massive import Detection

from conftest import compose

ITEM = Item(0, "a red fox runs through fresh snow", 0, 7)
STEPS = 4  # the default window [0, 0.4) steers steps 0 and 1


def build(model: str, *overrides: str):
    cfg = compose([f"model={model}", "logger=none", f"model.steps={STEPS}", *overrides])
    backbone = validate(cfg)
    pipe = load_pipeline(cfg.model, backbone)
    pipe.set_progress_bar_config(disable=True)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    return cfg, backbone, pipe, layout


@functools.lru_cache(maxsize=None)
def generate(model: str, *overrides: str) -> dict:
    """One sampling call (stas's own loop) with the config's steering attached: frames and steering record (cached
    per config)."""
    cfg, backbone, pipe, layout = build(model, *overrides)
    steerer, loop = make_steerer(cfg, backbone), make_loop(cfg, backbone)
    kwargs = backbone.pipeline_kwargs(cfg.model)
    if steerer is None:
        return {"frames": np.asarray(run_pipeline(pipe, ITEM, kwargs, None, layout, loop).frames[0]), "record": None}
    with steerer.attach(pipe.transformer):
        frames = np.asarray(run_pipeline(pipe, ITEM, kwargs, steerer, layout, loop).frames[0])
    return {"frames": frames, "record": steerer.record()}


def test_group_offloading_leaves_a_short_stas_run_bit_identical():
    """The quick check: two steps, the first steered."""
    short = ("model.steps=2",)
    plain, offloaded = generate("tiny_wan21", *short), generate("tiny_wan21", *short, "model.group_offload=block_level")
    assert offloaded["record"]["values_steered"] > 0 and offloaded["record"] == plain["record"]
    np.testing.assert_array_equal(offloaded["frames"], plain["frames"])


@pytest.mark.slow
@pytest.mark.parametrize("model, overrides", [
    ("tiny_wan21", ("model.group_offload=block_level",)),
    ("tiny_wan21", ("model.group_offload=leaf_level",)),
    ("tiny_wan21", ("model.group_offload=block_level", "model.group_offload_blocks=2")),
    ("tiny_cogvideox", ("model.group_offload=block_level",)),
    ("tiny_cogvideox", ("model.group_offload=leaf_level",)),
    ("tiny_ltx", ("model.group_offload=block_level",)),
    ("tiny_ltx", ("model.group_offload=leaf_level",)),
])
def test_group_offloading_leaves_stas_bit_identical(model, overrides):
    plain, offloaded = generate(model), generate(model, *overrides)
    assert offloaded["record"]["values_steered"] > 0
    assert offloaded["record"] == plain["record"]
    np.testing.assert_array_equal(offloaded["frames"], plain["frames"])


@pytest.mark.slow
def test_group_offloading_leaves_vanilla_bit_identical():
    np.testing.assert_array_equal(generate("tiny_wan21", "steer=none", "model.group_offload=leaf_level")["frames"],
                                  generate("tiny_wan21", "steer=none")["frames"])


def test_group_offloading_is_applied():
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    _, _, pipe, _ = build("tiny_wan21", "model.group_offload=leaf_level")
    assert _is_group_offload_enabled(pipe.transformer)
    assert not _is_group_offload_enabled(pipe.vae)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_wan21", "tiny_cogvideox"])
def test_float8_storage_is_steered_like_uncast(model):
    cast = ("model.layerwise_casting=float8_e4m3fn",)
    _, _, pipe, _ = build(model, *cast)
    stored = {p.dtype for p in pipe.transformer.parameters()}
    assert torch.float8_e4m3fn in stored  # the blocks' linear layers; diffusers keeps norms and embeddings as they are
    steered, vanilla, uncast = generate(model, *cast), generate(model, *cast, "steer=none"), generate(model)
    assert np.isfinite(steered["frames"]).all()
    assert np.abs(steered["frames"] - uncast["frames"]).max() > 1e-3  # float8 weights: another video...
    assert np.abs(steered["frames"] - vanilla["frames"]).max() > 1e-2  # ...which STAS still changes
    assert steered["record"]["values_steered"] > 0
    assert steered["record"]["hook_calls"] == uncast["record"]["hook_calls"]
    assert steered["record"]["steps"] == uncast["record"]["steps"]


@pytest.mark.slow
def test_group_offloading_of_float8_weights_is_bit_identical():
    cast = ("model.layerwise_casting=float8_e4m3fn",)
    plain, offloaded = generate("tiny_wan21", *cast), generate("tiny_wan21", *cast, "model.group_offload=block_level")
    assert offloaded["record"] == plain["record"]
    np.testing.assert_array_equal(offloaded["frames"], plain["frames"])


def capture_readout(*overrides: str):
    """stas.analyze's sampling of the tiny Wan twin: STAS attached, then the capture; latents only."""
    cfg, backbone, pipe, layout = build("tiny_wan21", *overrides)
    kwargs = {**backbone.pipeline_kwargs(cfg.model), "output_type": "latent"}
    selection = analysis_selection(cfg.analysis, backbone.num_layers, cfg.model.steps)
    capture = MACapture(backbone, selection, Detection.of(cfg.detect), cfg.steer.boundary_width,
                        cfg.steer.boundary_unit)
    steerer = make_steerer(cfg, backbone)
    with steerer.attach(pipe.transformer), capture.attach(pipe.transformer):
        capture.begin(layout, cfg.model.steps, backbone.uses_cfg(kwargs))
        run_pipeline(pipe, ITEM, kwargs, steerer, layout)
        return capture.read()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["block_level", "leaf_level"])
def test_capture_under_group_offloading_equals_plain(mode):
    plain, offloaded = capture_readout(), capture_readout(f"model.group_offload={mode}")
    for name in ("peaks", "regions", "tokens"):
        expected = getattr(plain, name)
        assert not torch.isnan(expected[..., 0]).any()
        torch.testing.assert_close(getattr(offloaded, name), expected, rtol=0, atol=0, equal_nan=True)


def test_memory_options_are_validated():
    cases = [
        (("model.group_offload=blocks",),
         r"model\.group_offload='blocks' is not allowed; allowed: none, block_level, leaf_level"),
        (("model.layerwise_casting=float8",),
         r"model\.layerwise_casting='float8' is not allowed; allowed: none, float8_e4m3fn, float8_e5m2"),
        (("model.group_offload_blocks=0",), r"model\.group_offload_blocks=0 must be an integer in \[1, 4096\]"),
        (("model.group_offload=block_level", "model.cpu_offload=model"),
         r"model\.group_offload=block_level cannot be combined with model\.cpu_offload=model"),
        (("model.layerwise_casting=float8_e5m2", "model.cpu_offload=sequential"),
         r"model\.layerwise_casting=float8_e5m2 cannot be combined with model\.cpu_offload=sequential"),
        (("model.group_offload=leaf_level", "model.compile=regional"),
         r"model\.compile=regional cannot be combined with model\.group_offload=leaf_level"),
        (("model.group_offload=block_level", "model.compile=full"),
         r"model\.compile=full cannot be combined with model\.group_offload=block_level"),
        (("model.layerwise_casting=float8_e4m3fn", "model.compile=full"),
         r"model\.compile=full cannot be combined with model\.layerwise_casting=float8_e4m3fn"),
        (("model.group_offload_stream=true",),
         r"model\.group_offload_stream=true prefetches .* but model\.group_offload=none"),
        (("model.group_offload=block_level", "model.group_offload_stream=true", "model.device=cpu"),
         r"model\.group_offload_stream=true needs a CUDA device .* model\.device=cpu"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(compose(["model=tiny_wan21", "logger=none", *overrides]))
    validate(compose(["model=tiny_wan21", "logger=none", "model.group_offload=leaf_level",
                      "model.layerwise_casting=float8_e4m3fn"]))
    validate(compose(["model=tiny_wan21", "logger=none", "model.group_offload=block_level", "model.compile=regional"]))


def test_a_side_stream_on_a_cpu_run_is_refused_at_load():
    """model.device=auto resolves to the CPU here: the side stream is refused when the pipeline is placed, with
    the field named, not with diffusers' ValueError."""
    from stas.backbones import BackboneError

    with pytest.raises(BackboneError, match=r"model\.group_offload_stream=true needs a CUDA device .* runs on cpu"):
        build("tiny_wan21", "model.group_offload=block_level", "model.group_offload_stream=true")


def test_group_offloading_is_not_identity_and_casting_is():
    plain = identity(compose(["model=tiny_wan21", "logger=none"]))
    assert identity(compose(["model=tiny_wan21", "logger=none", "model.group_offload=leaf_level",
                             "model.group_offload_blocks=3", "model.group_offload_stream=true"])) == plain
    assert identity(compose(["model=tiny_wan21", "logger=none", "model.layerwise_casting=float8_e4m3fn"])) != plain


@pytest.mark.slow
def test_compiled_blocks_with_block_level_offloading_equal_eager():
    """model.compile=regional + group_offload=block_level: diffusers' onload/offload run outside the graphs (one
    graph break a group); after the warm-up call nothing compiles again, and STAS's frames and record are eager's."""
    from stas.backbones import compile_counts, reset_compiler

    eager = generate("tiny_wan21")
    reset_compiler()
    try:
        cfg, backbone, pipe, layout = build("tiny_wan21", "model.compile=regional", "model.group_offload=block_level")
        steerer, kwargs = make_steerer(cfg, backbone), backbone.pipeline_kwargs(cfg.model)
        results = []
        with steerer.attach(pipe.transformer):
            for _ in range(2):
                frames = np.asarray(run_pipeline(pipe, ITEM, kwargs, steerer, layout).frames[0])
                results.append((frames, steerer.record(), compile_counts()))
    finally:
        reset_compiler()
    (_, _, warm), (_, _, second) = results
    assert warm["graphs"] > 0 and warm["recompiles"] == 0 and second == warm, (warm, second)
    for frames, record, _ in results:
        assert record == eager["record"]
        np.testing.assert_allclose(frames, eager["frames"], rtol=0, atol=1e-4)  # inductor reorders float math
