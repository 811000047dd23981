"""Metrics against hand-computed values (the numbers in the comments are worked out by hand)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from patchify import metrics as M

# The module docstring's worked example.
RANKING = ["a", "x", "b", "J", "y", "c"]
POS = {"a", "b", "c", "d"}
JUNK = {"J"}
BOXES = [(0, 0, 10, 10), None, (0, 0, 10, 10), None, None, (50, 50, 60, 60)]
GT = {"a": [(0, 0, 10, 5)], "b": [(100, 100, 110, 110), (0, 0, 10, 10)], "c": [(0, 0, 10, 10)],
      "d": [(0, 0, 1, 1)]}


def test_box_iou():
    assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5
    assert M.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert M.box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching, exclusive max
    assert M.best_iou((0, 0, 10, 10), GT["b"]) == 1.0  # best of several gt boxes
    assert M.best_iou(None, GT["b"]) == 0.0
    assert M.best_iou((0, 0, 10, 5), (0, 0, 10, 10)) == 0.5  # a single box is accepted too


def test_worked_example_standard_ap():
    # junk removed -> [a, x, b, y, c]; precisions 1, 2/3, 3/5; d never retrieved; n_pos = 4
    assert M.positive_ranks(RANKING, POS, JUNK).tolist() == [0, 2, 4]
    assert M.average_precision(RANKING, POS, JUNK) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)


def test_worked_example_roxford_ap():
    # trapezoids: (1+1)/2, (1/2+2/3)/2, (2/4+3/5)/2
    expected = (1 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 4
    assert M.average_precision(RANKING, POS, JUNK, variant="roxford") == pytest.approx(expected)
    assert expected == pytest.approx(0.533333, abs=1e-6)


def test_roxford_matches_revisitop_reference_loop():
    # The revisitop compute_ap loop, written out, on a random case.
    rng = np.random.default_rng(0)
    ids = list(range(40))
    rng.shuffle(ids)
    pos = set(range(0, 40, 3)) | {100}  # 100 never retrieved
    ranks = M.positive_ranks(ids, pos)
    ref = 0.0
    for j, r in enumerate(ranks):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ref += (p0 + p1) / 2 / len(pos)
    assert M.average_precision(ids, pos, variant="roxford") == pytest.approx(ref)


def test_junk_is_removed_not_negative():
    assert M.average_precision(["J", "a"], {"a"}, {"J"}) == 1.0
    assert M.average_precision(["J", "a"], {"a"}) == 0.5  # without junk J is a negative


def test_perfect_and_never_retrieved():
    assert M.average_precision(["a", "b", "x"], {"a", "b"}) == 1.0
    assert M.average_precision(["x", "y"], {"a", "b"}) == 0.0  # positives never retrieved
    assert M.average_precision([], {"a"}) == 0.0
    # one of two positives retrieved at the top: AP = 1/2
    assert M.average_precision(["a", "x"], {"a", "b"}) == 0.5


def test_no_positives_is_nan_and_skipped_in_mean():
    assert math.isnan(M.average_precision(["a", "b"], set()))
    assert math.isnan(M.average_precision(["a"], {"J"}, {"J"}))  # only positive is junk
    assert math.isnan(M.recall_at_k(["a"], set(), 1))
    assert math.isnan(M.average_precision_at_k(["a"], set(), 5))
    assert M.mean_average_precision([0.5, math.nan, 1.0]) == 0.75
    assert math.isnan(M.mean_average_precision([math.nan]))


def test_ties_pessimistic_optimistic_given():
    ranking, scores, pos = ["a", "x", "b"], [0.9, 0.9, 0.5], {"a", "b"}
    # pessimistic: [x, a, b] -> (1/2 + 2/3) / 2
    assert M.average_precision(ranking, pos, scores=scores) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # optimistic: [a, x, b] -> (1 + 2/3) / 2
    assert M.average_precision(ranking, pos, scores=scores, ties="optimistic") == pytest.approx((1 + 2 / 3) / 2)
    assert M.average_precision(ranking, pos, scores=scores, ties="given") == pytest.approx((1 + 2 / 3) / 2)
    # all scores equal: pessimistic puts every negative first
    assert M.average_precision(["a", "x", "y"], {"a"}, scores=[1, 1, 1]) == pytest.approx(1 / 3)
    assert M.recall_at_k(["a", "x"], {"a"}, 1, scores=[1, 1]) == 0.0
    # scores also re-sort an unsorted ranking
    assert M.average_precision(["x", "a"], {"a"}, scores=[0.1, 0.2]) == 1.0


def test_ap_at_k():
    # [a, x, b, y, c] with 4 positives: AP@3 = (1 + 2/3) / min(4, 3)
    assert M.average_precision_at_k(RANKING, POS, 3, JUNK) == pytest.approx((1 + 2 / 3) / 3)
    assert M.average_precision_at_k(RANKING, POS, 1, JUNK) == 1.0
    # k larger than the list: denominator min(n_pos, k) = n_pos -> equals AP
    assert M.average_precision_at_k(RANKING, POS, 100, JUNK) == pytest.approx(M.average_precision(RANKING, POS, JUNK))
    with pytest.raises(ValueError):
        M.average_precision_at_k(RANKING, POS, 0)


def test_recall_at_k():
    assert M.recall_at_k(RANKING, POS, 1, JUNK) == 1.0
    assert M.recall_at_k(["x", "J", "a"], {"a"}, 2, {"J"}) == 1.0  # junk does not use up a slot
    assert M.recall_at_k(["x", "J", "a"], {"a"}, 1, {"J"}) == 0.0
    assert M.recall_at_k(["x", "y"], {"a"}, 5) == 0.0


def test_locscore_worked_example():
    # IoUs: a 0.5, b 1.0 (best of its two gt boxes), c 0.0 -> (1*0.5 + 2/3*1 + 3/5*0) / 4
    got = M.loc_score(RANKING, BOXES, POS, GT, JUNK)
    assert got == pytest.approx((0.5 + 2 / 3) / 4)
    assert got == pytest.approx(0.291667, abs=1e-6)
    assert got <= M.average_precision(RANKING, POS, JUNK)


def test_locscore_perfect_boxes_equals_ap_and_checks_inputs():
    gt = {"a": [(0, 0, 4, 4)], "b": [(1, 1, 3, 3)]}
    ranking, boxes = ["a", "x", "b"], [(0, 0, 4, 4), (0, 0, 1, 1), (1, 1, 3, 3)]
    assert M.loc_score(ranking, boxes, {"a", "b"}, gt) == pytest.approx(M.average_precision(ranking, {"a", "b"}))
    with pytest.raises(ValueError):
        M.loc_score(ranking, boxes[:2], {"a", "b"}, gt)
    with pytest.raises(ValueError):
        M.loc_score(ranking, boxes, {"a", "b", "z"}, gt)  # z has no gt box
    assert math.isnan(M.loc_score(ranking, boxes, set(), gt))


def test_duplicate_ids_rejected():
    with pytest.raises(ValueError):
        M.average_precision(["a", "a"], {"a"})


def test_evaluate_rankings_and_summary():
    rankings = [RANKING, ["a", "x"], ["x", "y"]]
    boxes = [BOXES, [(0, 0, 4, 4), None], [None, None]]
    gts = [
        M.QueryGroundTruth(frozenset(POS), frozenset(JUNK), GT),
        {"positives": ["a"], "boxes": {"a": (0, 0, 4, 4)}},  # dict form, single box
        {"positives": []},  # no positives: skipped
    ]
    ev = M.evaluate_rankings(rankings, boxes, gts, map_k=3, recall_ks=(1, 5), query_ids=["q0", "q1", "q2"])
    assert ev.query_ids == ["q0", "q1", "q2"]
    ap0 = (1 + 2 / 3 + 3 / 5) / 4
    assert ev.ap[0] == pytest.approx(ap0) and ev.ap[1] == 1.0 and math.isnan(ev.ap[2])
    s = ev.summary()
    assert s["mAP"] == pytest.approx((ap0 + 1) / 2)
    assert s["LocScore"] == pytest.approx(((0.5 + 2 / 3) / 4 + 1) / 2)
    assert s["R@1"] == 1.0 and s["R@5"] == 1.0
    assert s["mAP@3"] == pytest.approx(((1 + 2 / 3) / 3 + 1) / 2)
    assert s["n_queries"] == 2
    assert ev.r1.tolist()[:2] == [1.0, 1.0]


def test_evaluate_without_boxes_gives_nan_locscore():
    ev = M.evaluate_rankings([["a"]], None, [{"positives": ["a"]}])
    assert ev.summary()["mAP"] == 1.0 and math.isnan(ev.summary()["LocScore"])


def test_rankings_from_hits():
    class H:
        def __init__(self, image_id, score, box, path=""):
            self.image_id, self.score, self.box, self.path = image_id, score, box, path

    hits = [[H(3, 0.9, (0, 0, 2, 2)), H(1, 0.5, (1, 1, 2, 2))]]
    rankings, boxes, scores = M.rankings_from_hits(hits)
    assert rankings == [[3, 1]] and boxes == [[(0, 0, 2, 2), (1, 1, 2, 2)]] and scores == [[0.9, 0.5]]
    ev = M.evaluate_rankings(rankings, boxes, [{"positives": [1], "boxes": {1: [(1, 1, 2, 2)]}}], scores=scores)
    assert ev.ap[0] == 0.5 and ev.loc_score[0] == 0.5


def test_locscore_ties_keep_boxes_with_their_images():
    # scores reorder [a, x] to [x, a] (pessimistic tie); a's box must travel with it: IoU 1 at precision 1/2
    gt = {"a": [(0, 0, 4, 4)]}
    got = M.loc_score(["a", "x"], [(0, 0, 4, 4), (9, 9, 10, 10)], {"a"}, gt, scores=[1.0, 1.0])
    assert got == pytest.approx(0.5)
    # roxford LocScore, a at 0-based rank 1: P0 = 0/1, P1 = 1/2 -> (0 + 1/2) / 2 = 0.25, times IoU 0.5
    assert M.loc_score(["x", "a"], [None, (0, 0, 4, 2)], {"a"}, gt, variant="roxford") == pytest.approx(0.25 * 0.5)


def test_evaluate_rankings_roxford_variant():
    ev = M.evaluate_rankings([RANKING], None, [M.QueryGroundTruth(frozenset(POS), frozenset(JUNK))], variant="roxford")
    assert ev.summary()["mAP"] == pytest.approx(0.533333, abs=1e-6)
    with pytest.raises(ValueError):
        M.average_precision(RANKING, POS, variant="trapezoid")
    with pytest.raises(ValueError):
        M.average_precision(RANKING, POS, scores=[1] * 6, ties="random")
