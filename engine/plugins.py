"""Code from the layers above engine/ plugged in by name ('package.module:Class'), so the
engine imports none of them: worker extensions of EP ranks, KV connectors."""

from __future__ import annotations

import importlib


def load_class(spec: str):
    """'package.module:ClassName' -> the class."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{spec!r} must look like 'package.module:ClassName'")
    return getattr(importlib.import_module(module), name)
