"""The shipped type stub of the C++ module (python/patchify/_core.pyi) must match the built module; regenerate it
with tools/gen_stubs.sh after changing the bindings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import patchify

ALLOWLIST = Path(__file__).with_name("stubtest_allowlist.txt")


def test_core_stub_matches_the_extension():
    pytest.importorskip("mypy.stubtest")
    package_root = Path(patchify.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "mypy.stubtest", "patchify._core", "--allowlist", str(ALLOWLIST)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_is_typed():
    assert (Path(patchify.__file__).parent / "py.typed").is_file()
    assert (Path(patchify.__file__).parent / "_core.pyi").is_file()
