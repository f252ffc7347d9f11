"""Shared test configuration: hypothesis profiles and the device parameter."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import mixkv

settings.register_profile(
    "default",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "gpu",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("MIXKV_HYPOTHESIS_PROFILE", "default"))

HAS_CUDA = mixkv.cuda_available() and torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")]),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Runs a test once on the CPU twin and once on the CUDA kernels (when present)."""
    return request.param
