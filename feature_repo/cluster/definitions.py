"""The cluster flavour's definitions: exactly those of ``../definitions.py``, loaded by path.

Feast scans only the folder given with ``-c``, so this file re-exports the parent's objects instead
of defining any: one set of definitions for both flavours.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PARENT = Path(__file__).resolve().parent.parent / "definitions.py"
_spec = importlib.util.spec_from_file_location("tuneloop_feature_repo_definitions", _PARENT)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

entity = _module.entity
texts_source = _module.texts_source
texts_view = _module.texts_view
text_statistics_view = _module.text_statistics_view
feature_service = _module.feature_service
