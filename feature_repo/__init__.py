"""The Feast repository (``feature_store.yaml``, ``definitions.py``, ``cluster/``), shipped in the
tuneloop wheel.

A package only so that ``importlib.resources.files("feature_repo")`` finds the installed folder; Feast
loads the repository by path and skips ``__init__.py``.
"""
