"""Test configuration: Triton's CPU interpreter on machines without CUDA, and the `gpu` marker.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before cce_patch's
kernel modules are imported; conftest.py is imported by pytest before any test module.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_filter_choices():
    """Each test's filtered calls choose dense or block-sparse from their own counts, not from another test's
    call of the same shape (``filter_plan.chunk_counts`` remembers them across calls)."""
    try:
        from cce_patch.ops.fused.filter_plan import forget_chunk_counts
    except ImportError:  # no Triton: nothing remembers counts
        yield
        return
    forget_chunk_counts()
    yield


class _TF32Switch:
    """Sets ``torch.backends.cuda.matmul.allow_tf32`` for one test (pytest's monkeypatch cannot restore
    that attribute: torch implements it as a property of a module object)."""

    def __init__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32

    def set(self, on: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = on


@pytest.fixture
def tf32():
    switch = _TF32Switch()
    yield switch
    torch.backends.cuda.matmul.allow_tf32 = switch.saved
