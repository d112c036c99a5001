"""Modules imported when first used, not when a resflax module is imported.

TFDS and grain take about 0.25 s to import on a 2-core machine; commands that read only a run's checkpoint
(``resflax predict``, ``export``) never touch a dataset or a loader, so the data modules name them through a
``LazyModule`` and the import happens at the first attribute read (``tfds.data_source``, ``grain.MapDataset``).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module ``name``: the first attribute read imports it (``importlib.import_module``, so a
    missing package fails there, with Python's own error) and every read is the module's attribute."""

    def __init__(self, name: str):
        self._name = name

    def module(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str):
        return getattr(self.module(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
