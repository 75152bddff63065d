"""The same frames, bit for bit, for every tiny twin and steering preset: the guard of every refactor.

`tests/golden/frames.json` holds the sha256 of the float32 frames (and of the steering record) that stas's
generation path produced for each (twin, steering case) when the file was recorded (then `pipe(...)`; since
stas.loop, stas's own loop with guidance=cfg, which must give the same bits). A refactor that changes a
single bit of any of them fails here. Bit identity only holds for the same torch build and CPU kernel set, so the
file records both and the test is skipped, saying why, on another one; re-record with

    STAS_RECORD_GOLDEN=1 python -m pytest tests/test_golden_frames.py

only when a change of output is intended (and say so in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose

GOLDEN = Path(__file__).parent / "golden" / "frames.json"
TWINS = ("tiny_wan21", "tiny_wan22", "tiny_cogvideox", "tiny_hunyuanvideo", "tiny_ltx")
# Every preset in conf/steer, plus the settings no preset covers: one branch, fixed channels, every channel.
CASES = {
    "none": ["steer=none"],
    "stas": ["steer=stas"],
    "stas_paper": ["steer=stas_paper"],
    "amplify": ["steer=amplify"],
    "amplify_all": ["steer=amplify_all"],
    "per_channel_max": ["steer=per_channel_max"],
    "zero_ma": ["steer=zero_ma"],
    "stas_cond_only": ["steer=stas", "steer.branches=cond"],
    "stas_fixed_channels": ["steer=stas", "steer.dims=[3,17]"],
    "scale_all_channels": ["steer=amplify", "steer.dims=all", "steer.alpha=1.5"],
}
# Short runs: 4 steps (2 in the default window), 9 frames (3 latent frames, tiny_ltx 2: first, interior, boundaries).
SIZE = ["model.steps=4", "model.num_frames=9"]


def machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def digest(array) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def outputs_of(twin: str, case: str) -> dict:
    """sha256 of the frames and of the steering record that stas.generation's path gives for one case."""
    from stas.backbones import load_pipeline
    from stas.config import validate
    from stas.generation import make_loop, make_steerer, run_items, run_pipeline
    from stas.core.layout import TokenLayout

    cfg = compose([f"model={twin}", "logger=none", *SIZE, *CASES[case]])
    backbone = validate(cfg)
    pipe = load_pipeline(cfg.model, backbone)
    pipe.set_progress_bar_config(disable=True)
    steerer = make_steerer(cfg, backbone)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    kwargs = backbone.pipeline_kwargs(cfg.model)
    item, loop = run_items(cfg)[0], make_loop(cfg, backbone)
    if steerer is None:
        frames = run_pipeline(pipe, item, kwargs, None, layout, loop).frames[0]
        return {"frames": digest(frames)}
    with steerer.attach(pipe.transformer):
        frames = run_pipeline(pipe, item, kwargs, steerer, layout, loop).frames[0]
    record = json.dumps(steerer.record(), sort_keys=True)
    return {"frames": digest(frames), "steering": hashlib.sha256(record.encode()).hexdigest()}


def recorded() -> dict:
    if os.environ.get("STAS_RECORD_GOLDEN") == "1":
        entries = {f"{twin}/{case}": outputs_of(twin, case) for twin in TWINS for case in CASES}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"machine": machine(), "entries": entries}, indent=1, sort_keys=True) + "\n")
    return json.loads(GOLDEN.read_text())


# The quick tier (-m "not slow") checks vanilla and STAS on every twin; the full suite every case.
QUICK_CASES = ("none", "stas")


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("case", [case if case in QUICK_CASES else pytest.param(case, marks=pytest.mark.slow)
                                  for case in CASES])
def test_frames_bit_identical_to_golden(twin, case):
    golden = recorded()
    if golden["machine"] != machine():
        pytest.skip(f"golden frames were recorded with {golden['machine']}, this is {machine()}")
    assert outputs_of(twin, case) == golden["entries"][f"{twin}/{case}"]


def test_golden_covers_every_steer_preset_and_twin():
    presets = {path.stem for path in (Path(__file__).parent.parent / "conf" / "steer").glob("*.yaml")}
    assert presets <= set(CASES)
    entries = recorded()["entries"]
    assert set(entries) == {f"{twin}/{case}" for twin in TWINS for case in CASES}
    # Not vacuous: every steering case changed the frames of its twin.
    for twin in TWINS:
        assert all(entries[f"{twin}/{case}"]["frames"] != entries[f"{twin}/none"]["frames"]
                   for case in CASES if case != "none")


def test_golden_check_sees_a_one_bit_change():
    """The comparison can fail: flipping one bit of one frame value changes the digest."""
    frames = np.linspace(0, 1, 3 * 8 * 8 * 3, dtype=np.float32).reshape(3, 8, 8, 3)
    flipped = frames.copy()
    flipped.view(np.uint32)[1, 2, 3, 0] ^= 1
    assert digest(frames) != digest(flipped)
    assert digest(frames) == digest(frames.copy())
