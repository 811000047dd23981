"""Imported first by the benchmark scripts: in a source checkout with the in-place build (tools/dev_build.sh),
python/ goes first on sys.path; otherwise the installed patchify is used (python/ has no _core there)."""
from __future__ import annotations

import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "python"
HAS_INPLACE_BUILD = any((SOURCE / "patchify").glob("_core*.so"))
if HAS_INPLACE_BUILD and str(SOURCE) not in sys.path:
    sys.path.insert(0, str(SOURCE))
