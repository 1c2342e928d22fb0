"""dtype "auto" picks bfloat16 only where a batched bf16 matmul measures clearly faster than fp32."""

import pytest
import torch

from lmforge import hardware
from lmforge.errors import ValidationError


@pytest.mark.parametrize("bf16_seconds,expected", [(0.001, torch.bfloat16), (0.0025, torch.float32),
                                                   (0.3, torch.float32)], ids=["amx", "barely-faster", "emulated"])
def test_auto_follows_the_measurement(monkeypatch, bf16_seconds, expected):
    monkeypatch.setattr(hardware, "_seconds", lambda dtype: bf16_seconds if dtype == torch.bfloat16 else 0.003)
    hardware.fast_batched_dtype.cache_clear()
    try:
        assert hardware.resolve_dtype("auto") == expected
    finally:
        hardware.fast_batched_dtype.cache_clear()


def test_the_measurement_times_real_matmuls():
    assert 0 < hardware._seconds(torch.float32) < 1


def test_explicit_dtypes_and_bad_names():
    assert hardware.resolve_dtype("float32") == torch.float32
    assert hardware.resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValidationError, match="auto, float32, bfloat16"):
        hardware.resolve_dtype("fp8")
