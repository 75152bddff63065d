"""The evaluators, one module each (or a few alike in one module): every module of this package is imported here,
and each registers its evaluators with `stas.evaluation.base.register`. Adding an evaluator is adding a module
here; nothing else names it (docs/evaluation.md, "Adding an evaluator").

Modules are imported in the order of their names, and the registry keeps that order (it is the order of the eval
config's nodes and of the allowed names in messages).
"""

import importlib
import pkgutil

MODULES = tuple(module.name for module in pkgutil.iter_modules(__path__, prefix=f"{__name__}."))
for _module in MODULES:
    importlib.import_module(_module)
