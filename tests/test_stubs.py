"""The shipped type stub of the C++ module (python/patchify/_core.pyi) must match the built module; regenerate it
with tools/gen_stubs.sh after changing the bindings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import env_importing_tested_patchify

import patchify

ALLOWLIST = Path(__file__).with_name("stubtest_allowlist.txt")


def test_core_stub_matches_the_extension():
    pytest.importorskip("mypy.stubtest")
    result = subprocess.run([sys.executable, "-m", "mypy.stubtest", "patchify._core", "--allowlist", str(ALLOWLIST)],
                            capture_output=True, text=True, env=env_importing_tested_patchify(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_is_typed():
    assert (Path(patchify.__file__).parent / "py.typed").is_file()
    assert (Path(patchify.__file__).parent / "_core.pyi").is_file()
