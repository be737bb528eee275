"""Sampling and loss kernels: PyTorch references beside Triton kernels."""

from __future__ import annotations

import os

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
