"""Package exports imported on first use, so that building the command line (which imports every
subcommand's module, and with it its package) does not load torch for ``--help`` or ``results``."""

from __future__ import annotations

import importlib
import sys
import types


class _LazyPackage(types.ModuleType):
    """A package whose public names are imported from their submodules when first asked for."""

    _lazy_where: dict[str, str]

    def __getattr__(self, name: str):  # only for names not yet bound
        module = self.__dict__.get("_lazy_where", {}).get(name)
        if module is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, self.__name__), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # Importing submodule ``pimr`` binds it on the package, which would hide the function
        # ``pimr`` exported under that name (an eager ``from .pimr import pimr`` rebinds it).
        if name in self._lazy_where and getattr(value, "__name__", None) == f"{self.__name__}.{name}":
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._lazy_where))


def lazy_exports(package: str, exports: dict[str, list[str]]) -> None:
    """Make ``package`` (call with ``__name__`` from its ``__init__``) import its public names on
    first use: ``exports`` maps a submodule (``.name``) to the names it provides."""
    module = sys.modules[package]
    module.__dict__["_lazy_where"] = {name: sub for sub, names in exports.items() for name in names}
    module.__class__ = _LazyPackage
