"""Property-based fuzzing against the references: a quick profile here; `make fuzz` runs 10,000+.

Settings come from the hypothesis profile: "quick" (default, in `make test`) or "fuzz"
(tools/fuzz.py). The Triton-interpreter slice is small because the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from spp_triton.testing import case_strategy, check_case

QUICK = int(os.environ.get("SPP_TRITON_FUZZ_EXAMPLES", "150"))
INTERPRETED = int(os.environ.get("SPP_TRITON_FUZZ_INTERPRETED", "40"))
COMMON = dict(
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@settings(max_examples=QUICK, **COMMON)
@given(case=case_strategy())
def test_fuzz_torch_path_against_reference(case):
    check_case(case)


@pytest.mark.usefixtures("triton_cpu")
@settings(max_examples=INTERPRETED, **COMMON)
@given(case=case_strategy())
def test_fuzz_triton_interpreter_against_reference(case):
    check_case(case)
