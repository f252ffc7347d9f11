"""The built extension: importable without a GPU, no libtorch dependency, kernels for every target."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import mixkv
from mixkv import _core

EXTENSION = Path(_core.__file__)


def test_imports_and_reports_cuda() -> None:
    assert isinstance(mixkv.cuda_available(), bool)
    assert isinstance(mixkv.cuda_compiled(), bool)
    if not mixkv.cuda_compiled():
        assert not mixkv.cuda_available()
    if os.environ.get("MIXKV_EXPECT_CUDA_COMPILED") == "1":
        assert mixkv.cuda_compiled(), "this build was expected to carry CUDA kernels"


def _needed_libraries() -> list[str]:
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not available")
    out = subprocess.run([readelf, "-d", str(EXTENSION)], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def test_extension_does_not_link_torch_or_shared_cudart() -> None:
    needed = _needed_libraries()
    assert needed, "readelf found no dynamic dependencies at all"
    for lib in needed:
        assert not lib.startswith(("libtorch", "libc10", "libcudart")), f"extension links {lib}"


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for candidate in Path(root).glob("cu*/bin/cuobjdump"):
            return str(candidate)
    return None


@pytest.mark.skipif(not mixkv.cuda_compiled(), reason="build without CUDA kernels")
def test_extension_carries_cubins_for_every_target() -> None:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not available (pip install nvidia-cuda-cuobjdump)")
    expected = os.environ.get("MIXKV_EXPECT_ARCHS", "80,86,89,90").split(",")
    elf = subprocess.run([tool, "--list-elf", str(EXTENSION)], capture_output=True, text=True).stdout
    found = set(re.findall(r"sm_(\d+)", elf))
    for arch in expected:
        assert arch in found, f"no sm_{arch} cubin in the extension (found {sorted(found)})"
    ptx = subprocess.run([tool, "--list-ptx", str(EXTENSION)], capture_output=True, text=True).stdout
    assert "sm_90" in ptx or "compute_90" in ptx, "no sm_90 PTX in the extension"
