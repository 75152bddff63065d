"""The backbone families (every module of stas/backbones/families/) and the backbone of a model config."""

from __future__ import annotations

import importlib
import pkgutil
from types import SimpleNamespace

import yaml

from stas.backbones import families
from stas.backbones.base import FAMILIES, Backbone, BackboneError
from stas.paths import CONF_DIR

# Importing a family module registers its Backbone subclass: adding a family is adding a module there.
for _module in pkgutil.iter_modules(families.__path__):
    importlib.import_module(f"{families.__name__}.{_module.name}")


def backbone_from_config(model_cfg) -> Backbone:
    """The Backbone of a `model` config node (its family, name and sizes)."""
    if model_cfg.family not in FAMILIES:
        raise BackboneError(f"model.family={model_cfg.family!r} is unknown; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[model_cfg.family](
        name=model_cfg.name, num_layers=int(model_cfg.num_layers), hidden_dim=int(model_cfg.hidden_dim)
    )


def available_models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def get_backbone(name: str) -> Backbone:
    """The backbone of a model config in conf/model/ (e.g. 'wan21_1.3b')."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise BackboneError(f"model={name!r} is not an option; available: {', '.join(available_models())}")
    node = yaml.safe_load(path.read_text())
    missing = [key for key in ("name", "family", "num_layers", "hidden_dim") if key not in node]
    if missing:
        raise BackboneError(f"{path} lacks {', '.join(missing)}")
    return backbone_from_config(SimpleNamespace(**node))


def backbone_of_pipeline(pipe, name: str | None = None) -> Backbone:
    """The Backbone of a diffusers pipeline built outside stas (its family from the pipeline, sizes from its
    transformer); `name` defaults to the checkpoint the pipeline was loaded from."""
    found = [family for family in FAMILIES.values() if family.describes(pipe)]
    if len(found) != 1:
        supported = ", ".join(sorted({family.pipeline for family in FAMILIES.values()}))
        raise BackboneError(f"{type(pipe).__name__} is {'no' if not found else 'more than one'} family stas knows "
                            f"(supported pipelines: {supported})")
    family = found[0]
    transformer = pipe.transformer
    probe = family(name="probe", num_layers=1, hidden_dim=1)
    num_layers = len(probe.blocks(transformer))
    name = name or getattr(pipe.config, "_name_or_path", None) or family.family
    return family(name=str(name), num_layers=num_layers, hidden_dim=probe.hidden_dim_of(transformer))
