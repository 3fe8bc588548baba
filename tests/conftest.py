"""Shared test set-up.

Triton's interpreter must be chosen before Triton compiles anything, so on a machine without CUDA
we set TRITON_INTERPRET=1 here, before spp_triton (and its kernels) are imported. CPU tensors then
go through the *torch* CPU path by default (SPP_TRITON_CPU_BACKEND=torch); kernel tests switch to
the Triton interpreter with the ``triton_cpu`` fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SPP_TRITON_CPU_BACKEND", "torch")

HAS_CUDA = torch.cuda.is_available()


def _interpreter_scalar_index_shim() -> None:
    """Triton 3.6's interpreter turns a runtime scalar (a shape-(1,) array) into a Python int with
    ``int(array)``, which NumPy >= 2.4 rejects, so every ``range()`` with runtime bounds fails
    there (triton-lang/triton#9171, fixed in later Triton by squeezing first). Squeeze it the same
    way on 3.6 only; the compiled GPU path is not affected."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    if not triton.__version__.startswith("3.6") or not hasattr(interpreter, "_patch_lang_tensor"):
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch


def pytest_configure(config):
    _interpreter_scalar_index_shim()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: the test machine's 2 cores are shared, and OpenMP's 2-thread barriers
    under contention are many times slower than one thread (timings and determinism checks also
    depend on it). Modules use it with ``pytest.mark.usefixtures``, or through ``d2_helpers``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def triton_cpu(monkeypatch):
    """Route CPU tensors through the Triton kernels (in Triton's interpreter) for this test."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter not enabled (TRITON_INTERPRET=1 must be set before import)")
    monkeypatch.setenv("SPP_TRITON_CPU_BACKEND", "triton")
    yield


@pytest.fixture
def torch_cpu(monkeypatch):
    """Route CPU tensors through the vectorised torch CPU path for this test."""
    monkeypatch.setenv("SPP_TRITON_CPU_BACKEND", "torch")
    yield
