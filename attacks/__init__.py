"""Attacks, one module each, registered by name in ``suite.interfaces.attack.ATTACKS`` when this package is imported."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
