"""Every saved-index format version ever released must still load and search identically
(fixtures in tests/fixtures/indices/vN, written by tests/fixtures/make_index_fixtures.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchify import Patchify
from patchify.store import SUPPORTED_VERSIONS

from conftest import ThumbnailBackbone
from fixtures.make_index_fixtures import query

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "indices"
SAVED = sorted(p for p in FIXTURES.glob("v*/*") if (p / "manifest.json").is_file())


def test_every_supported_version_has_fixtures():
    versions = {int(p.parent.name[1:]) for p in SAVED}
    assert versions == set(SUPPORTED_VERSIONS)
    assert {p.name for p in SAVED} >= {"flat", "ivfpq"}


@pytest.mark.parametrize("saved", SAVED, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_saved_index_loads_and_searches_as_when_saved(saved):
    engine = Patchify.load(saved, backbone=ThumbnailBackbone())  # type: ignore[arg-type]
    expected = json.loads((saved / "expected_hits.json").read_text())
    hits = engine.search(query(), k=len(expected))
    assert [h.image_id for h in hits] == [e["image_id"] for e in expected]
    assert [list(h.box) for h in hits] == [e["box"] for e in expected]
    assert [h.level for h in hits] == [e["level"] for e in expected]
    assert [h.score for h in hits] == pytest.approx([e["score"] for e in expected], abs=1e-5)


@pytest.mark.parametrize("saved", SAVED, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_saved_index_refuses_another_backbone(saved):
    with pytest.raises(ValueError, match="backbone mismatch"):
        engine = Patchify.load(saved, backbone=ThumbnailBackbone(input_size=48))  # type: ignore[arg-type]
        engine.search(query(), k=1)


def test_ivfpq_layout_is_read_from_the_faiss_file():
    """nbits=4 indexes saved before the fast-scan layout hold a plain IndexIVFPQ and are scanned as such; those
    saved since hold an IndexIVFPQFastScan (same manifest format: the faiss file says which)."""
    for saved in SAVED:
        if saved.name.startswith("ivfpq"):
            engine = Patchify.load(saved, backbone=ThumbnailBackbone())  # type: ignore[arg-type]
            assert engine.index.fast_scan == (saved.name == "ivfpq_fastscan"), saved
