"""The backbone and method registries: every family module registers itself, a family or method defined in a module
of its own works without editing a central file, and a name is registered once."""

from __future__ import annotations

import pkgutil

import pytest

from stas.backbones import FAMILIES, families, load_pipeline, register_family
from stas.backbones.families.wan import Wan21
from stas.config import ConfigError, validate
from stas.core.layout import TokenLayout
from stas.generation import make_steerer, run_items, run_pipeline
from stas.methods import METHODS, Method, StasSteerer, register_method

from conftest import compose


def test_every_family_module_registers_its_families():
    modules = {info.name for info in pkgutil.iter_modules(families.__path__)}
    assert modules == {"wan", "cogvideox", "hunyuan", "ltx"}
    assert set(FAMILIES) == {"wan21", "wan22", "cogvideox", "cogvideox15", "hunyuanvideo", "ltx"}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in FAMILIES.values()} == modules


@pytest.fixture
def toy_family():
    """A family defined outside stas/backbones/families (as a new module would be): Wan2.1 under another name."""

    @register_family("toy_wan")
    class ToyWan(Wan21):
        pass

    yield ToyWan
    del FAMILIES["toy_wan"]


def test_a_family_from_another_module_validates_loads_and_is_steered(toy_family):
    cfg = compose(["model=tiny_wan21", "logger=none", "model.family=toy_wan", "model.steps=2", "model.num_frames=5"])
    backbone = validate(cfg)
    assert type(backbone) is toy_family and backbone.family == "toy_wan"
    pipe = load_pipeline(cfg.model, backbone)
    pipe.set_progress_bar_config(disable=True)
    steerer = make_steerer(cfg, backbone)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    with steerer.attach(pipe.transformer):
        run_pipeline(pipe, run_items(cfg)[0], backbone.pipeline_kwargs(cfg.model), steerer, layout)
    assert steerer.record()["hook_calls"] == 2 * backbone.num_layers  # step 0 of 2 in the window, both branches


def test_an_unregistered_family_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model.family='toy_wan' is not allowed; allowed: .*wan21"):
        validate(compose(["model=tiny_wan21", "logger=none", "model.family=toy_wan"]))


def test_a_name_is_registered_once(toy_family):
    with pytest.raises(ValueError, match="registered twice"):
        register_family("toy_wan")(type("Again", (Wan21,), {}))
    with pytest.raises(ValueError, match="registered twice"):
        register_method("stas")(type("Again", (StasSteerer,), {}))


def test_a_method_from_another_module_is_registered_and_must_implement_the_interface():
    from stas.methods.enhance_a_video import EnhanceAVideo

    assert METHODS == {"stas": StasSteerer, "enhance_a_video": EnhanceAVideo}

    class Incomplete(Method):
        def attach(self, transformer):
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()

    @register_method("toy")
    class Toy(Method):
        def attach(self, transformer):
            return transformer

        def begin(self, layout, num_steps, do_cfg):
            pass

        def record(self):
            return {"method": self.method_name}

    try:
        assert METHODS["toy"] is Toy and Toy().record() == {"method": "toy"}
    finally:
        del METHODS["toy"]


def test_the_public_names_are_importable_from_the_package():
    import stas
    from stas import StasSteerer as Steerer, TokenLayout, apply_rule, get_backbone, massive_channel_mask

    assert Steerer is StasSteerer
    assert TokenLayout.for_video(get_backbone("wan21_1.3b"), 480, 832, 81).num_tokens == 32760
    assert callable(apply_rule) and callable(massive_channel_mask)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        stas.nothing
