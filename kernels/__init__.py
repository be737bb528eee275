"""Sampling and loss kernels: PyTorch references beside Triton kernels."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

if __name__ == "kernels":
    # Imported as a top-level `kernels` because a checkout's root is on sys.path (`python -m`,
    # pytest): Hugging Face's `kernels`, which transformers imports, belongs under that name.
    # Load it in this module's place; forgetless imports this one only as forgetless.kernels.
    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is not None:
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["kernels"])

import torch

from forgetless.errors import UserError


def backend(name: str) -> str:
    """`kernels.backend` resolved: auto is triton on CUDA and torch on the CPU."""
    if name == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    if name == "triton" and not torch.cuda.is_available() and not os.environ.get(
            "TRITON_INTERPRET"):
        raise UserError("kernels.backend=triton without a GPU needs TRITON_INTERPRET=1 "
                        "(Triton's interpreter: correct but slow)")
    return name
