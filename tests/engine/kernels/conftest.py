"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter
(no GPU in CI); the `gpu`-marked tests run them compiled at real shapes."""

import os

import torch

# Must be set before any kernel module is imported: triton.jit reads it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
