"""Helpers for experiment configs: typed ``get_config`` arguments and the settings shared by experiments."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"resnet110,seed=3,val=5000"`` into a ConfigDict over ``defaults``.

    A bare first token sets the first default (the model name); ``key=value`` pairs are parsed as Python
    literals and must match the type of the default. Unknown keys raise ``ValueError``.
    """
    out = dict(defaults)
    first = next(iter(defaults)) if defaults else None
    for i, token in enumerate(t.strip() for t in (arg or "").split(",") if t.strip()):
        if "=" not in token:
            if i != 0 or first is None:
                raise ValueError(f"config argument {token!r} must be key=value")
            out[first] = token
            continue
        key, raw = (s.strip() for s in token.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {', '.join(defaults)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        want = type(defaults[key])
        if want is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, want):
            raise ValueError(f"config argument {key}={raw!r} should be of type {want.__name__}")
        out[key] = value
    return ml_collections.ConfigDict(out)
