"""Report drawing and charts with stand-in hits on the shipped photos."""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from patchify import metrics as M
from patchify import report as R


@dataclass(frozen=True)
class FakeHit:
    rank: int
    image_id: int
    path: str
    score: float
    box: tuple
    level: int = 1


@pytest.fixture
def hits(photos):
    return [FakeHit(i, i, str(p), 0.9 - 0.1 * i, (10, 20, 110, 120), i % 3) for i, p in enumerate(photos[:4])]


def _colour_pixels(img: Image.Image, colour) -> int:
    return int(np.all(np.asarray(img) == np.array(colour, dtype=np.uint8), axis=-1).sum())


def test_draw_results_layout_and_boxes(photos, hits):
    img = R.draw_results(photos[5], hits, k=3, height=120)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.height == 120 + R.CAPTION_HEIGHT
    widths = [round(Image.open(p).width * 120 / Image.open(p).height) for p in [photos[5]] + photos[:3]]
    assert img.width == sum(widths) + 8 * 3  # query + 3 results, hits beyond k dropped
    assert _colour_pixels(img, R.HIT_COLOUR) > 0 and _colour_pixels(img, R.GT_COLOUR) == 0


def test_draw_results_groundtruth_by_sequence_and_mapping(photos, hits):
    by_seq = R.draw_results(photos[5], hits, k=2, groundtruth_boxes=[[(0, 0, 50, 50)], None], height=100)
    by_map = R.draw_results(photos[5], hits, k=2, groundtruth_boxes={hits[0].path: (0, 0, 50, 50)}, height=100)
    by_id = R.draw_results(photos[5], hits, k=2, groundtruth_boxes={0: [(0, 0, 50, 50)]}, height=100)
    for img in (by_seq, by_map, by_id):
        assert _colour_pixels(img, R.GT_COLOUR) > 0
    assert np.array_equal(np.asarray(by_seq), np.asarray(by_map))
    assert np.array_equal(np.asarray(by_seq), np.asarray(by_id))


def test_draw_results_accepts_arrays_and_relevance(photos, hits):
    q = np.asarray(Image.open(photos[0]).convert("RGB"))
    img = R.draw_results(q, hits, k=2, relevant={hits[0].path}, query_box=(0, 0, 30, 30), height=80)
    assert _colour_pixels(img, R.QUERY_COLOUR) > 0 and _colour_pixels(img, R.WRONG_COLOUR) > 0
    assert R.draw_results(q, [], k=5, height=80).height == 80 + R.CAPTION_HEIGHT  # no hits: query only


def test_save_report_png(tmp_path, photos, hits):
    out = R.save_report_png(tmp_path / "r.png", photos[5], hits, k=2, height=64)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.height == 64 + R.CAPTION_HEIGHT


def test_save_report_html_self_contained(tmp_path, photos, hits):
    out = R.save_report_html(tmp_path / "r.html", photos[5], hits, k=2, summary={"mAP": 0.5, "n": 3},
                             groundtruth_boxes=[[(0, 0, 50, 50)], None], height=64)
    text = out.read_text()
    assert "<html" in text and "mAP" in text and "0.5000" in text
    assert "src='http" not in text and 'src="http' not in text
    uris = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(uris) == 1
    assert base64.b64decode(uris[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.count(hits[1].path) >= 1 and "IoU" in text
    multi = R.save_report_html(tmp_path / "m.html", [photos[5], photos[6]], [hits, hits[:1]], k=1, height=48)
    assert len(re.findall(r"data:image/png;base64,", multi.read_text())) == 2
    with pytest.raises(ValueError):
        R.save_report_html(tmp_path / "x.html", [photos[5]], [hits, hits])


def _evaluation() -> M.RetrievalEvaluation:
    # q0: AP 1, LocScore 0.1 (found first, wrong place); q1: AP 1, LocScore 1; q2: AP 0.5, LocScore 0
    gts = [{"positives": ["a"], "boxes": {"a": (0, 0, 10, 10)}}, {"positives": ["b"], "boxes": {"b": (0, 0, 10, 10)}},
           {"positives": ["c"], "boxes": {"c": (0, 0, 10, 10)}}]
    boxes = [[(0, 0, 10, 1)], [(0, 0, 10, 10)], [None, (50, 50, 60, 60)]]
    return M.evaluate_rankings([["a"], ["b"], ["x", "c"]], boxes, gts, query_ids=["q0", "q1", "q2"])


def test_high_ap_low_loc():
    ev = _evaluation()
    assert ev.loc_score[0] == pytest.approx(0.1)
    assert [q.query for q in R.high_ap_low_loc(ev)] == ["q0"]
    got = R.high_ap_low_loc(ev, ap_min=0.5, loc_max=0.2)
    assert [q.query for q in got] == ["q0", "q2"]  # gaps 0.9 and 0.5, largest first
    assert R.high_ap_low_loc(ev, ap_min=1.01) == []


def test_plots(tmp_path):
    ev = _evaluation()
    p1 = R.plot_levels({0: ev.summary(), 1: ev, "L0+L1": {"mAP": 0.7, "LocScore": float("nan")}}, tmp_path / "l.png")
    p2 = R.plot_ap_vs_locscore(ev, tmp_path / "s.png")
    for p in (p1, p2):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 200
