"""Training-free methods that act through hooks during sampling: the hook machinery (hooks.py), the Method
interface and registry (base.py), STAS (stas.py)."""

import importlib
import pkgutil

from stas.methods.base import METHODS, Method, register_method
from stas.methods.hooks import BlockHooks, DenoisingTracker
from stas.methods.stas import StasSteerer, steering_calibration

__all__ = ["METHODS", "Method", "register_method", "BlockHooks", "DenoisingTracker", "StasSteerer",
           "steering_calibration"]

# Importing a method module registers it: adding a method is adding a module here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
