"""Shared registration glue: the op library handle and the dispatch explanations.

Schemas are defined in C++ (csrc/bindings.cpp) when the extension is built; otherwise this
module defines the same schemas from Python so the ops exist (with CPU/reference kernels) on
every install. ``explain`` says which implementation a call takes and why.
"""

from __future__ import annotations

from typing import Callable

import torch

from deepseek_kernels import _extension

NAMESPACE = "deepseek_kernels"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

_EXPLAINERS: dict[str, Callable[..., str]] = {}


def define(name: str, schema: str) -> None:
    """Defines ``name(schema)`` unless the C++ extension already did."""
    if not _extension.available():
        LIB.define(f"{name}{schema}")


def op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name)


def register_explainer(name: str, fn: Callable[..., str]) -> None:
    _EXPLAINERS[name] = fn


def explain(name: str, *args, **kwargs) -> str:
    """Which implementation ``deepseek_kernels.<name>(*args, **kwargs)`` runs here, and why.

    The answer starts with the path (``cuda:``, ``triton:`` or ``reference:``), then the reason."""
    if name not in _EXPLAINERS:
        raise ValueError(f"explain: unknown op {name!r}; known ops: {sorted(_EXPLAINERS)}")
    return _EXPLAINERS[name](*args, **kwargs)


def known_ops() -> list[str]:
    return sorted(_EXPLAINERS)
