"""Retrieval metrics: AP / mAP (standard and revisited-Oxford), mAP@k, recall@k and LocScore.

Conventions (shared by every function here)
-------------------------------------------
* A *ranking* is a sequence of database image ids (any hashable: int index, path string), best first.
* *positives* are the ids relevant to the query; *junk* ids are neither relevant nor irrelevant (revisited
  Oxford/Paris "junk", INSTRE/ILIAS ambiguous images). Junk ids are **deleted from the ranking before anything
  else is computed**, so they neither help nor hurt, and ranks / k are counted without them.
* Positives that never appear in the ranking still count in the denominator (a truncated top-k list is
  penalised for what it missed).
* A query with no positives has an undefined AP: functions return ``nan`` and aggregate means skip it (as the
  revisited-Oxford evaluation does).
* Ties: with ``scores`` given, items of equal score are reordered *pessimistically* by default (negatives
  before positives inside a tie group), so a method cannot gain AP from the arbitrary order of equal scores;
  ``ties="optimistic"`` is the opposite bound, ``ties="given"`` keeps the input order.

Formulas, with 0-based ranks r_1 < r_2 < ... < r_m of the m retrieved positives (after junk removal) and
n_pos = number of positives:

* standard AP  = 1/n_pos * sum_j P_j,              P_j = j / (r_j + 1)         (precision at the j-th positive)
* roxford AP   = 1/n_pos * sum_j (P0_j + P1_j) / 2,  P0_j = (j-1) / r_j (1 if r_j = 0), P1_j = j / (r_j + 1)
  (revisitop ``compute_ap``: trapezoids in the precision/recall plot)
* AP@k         = 1/min(n_pos, k) * sum_{j: r_j < k} P_j
* recall@k     = 1 if any positive is in the first k, else 0 (the "R@k" hit rate of instance retrieval)
* LocScore     = 1/n_pos * sum_j P_j * IoU_j, IoU_j = IoU of the j-th positive's winning patch box with its
  ground-truth box (the best-matching one when the image has several). LocScore <= AP; equality means every
  retrieved positive was found at exactly the right place.

Worked example
--------------
ranking = [a, x, b, J, y, c], positives = {a, b, c, d}, junk = {J}, winning-box IoUs a: 0.5, b: 1.0, c: 0.0.

Without the junk the ranking is [a, x, b, y, c]: positives at ranks 0, 2, 4 with precisions 1, 2/3, 3/5;
d was never retrieved but still counts, n_pos = 4.

* standard AP = (1 + 2/3 + 3/5) / 4 = 0.566667
* roxford AP  = ((1+1)/2 + (1/2+2/3)/2 + (2/4+3/5)/2) / 4 = (1 + 0.583333 + 0.55) / 4 = 0.533333
* AP@3        = (1 + 2/3) / min(4, 3) = 0.555556
* recall@1 = 1 (a is first), recall@2 = 1
* LocScore    = (1*0.5 + 2/3*1.0 + 3/5*0.0) / 4 = 0.291667

>>> round(average_precision(["a", "x", "b", "J", "y", "c"], {"a", "b", "c", "d"}, junk={"J"}), 6)
0.566667
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

Box = tuple[float, float, float, float]

__all__ = [
    "QueryGroundTruth", "RetrievalEvaluation", "QueryEvaluation",
    "box_iou", "best_iou", "positive_ranks", "average_precision", "average_precision_at_k", "recall_at_k",
    "loc_score", "mean_average_precision", "evaluate_rankings", "rankings_from_hits",
]

_VARIANTS = ("standard", "roxford")
_TIES = ("pessimistic", "optimistic", "given")


# ---------------------------------------------------------------------------------------------------- boxes
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with exclusive max (area = (x1-x0)*(y1-y0)); 0 for empty boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = float(ix) * float(iy)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_iou(box: Sequence[float] | None, gt_boxes: Iterable[Sequence[float]]) -> float:
    """IoU with the best-matching ground-truth box (an image may hold several copies of the object);
    0 when no box was returned."""
    if box is None:
        return 0.0
    return max((box_iou(box, g) for g in _as_box_list(gt_boxes)), default=0.0)


# -------------------------------------------------------------------------------------------------- ranking
def _clean_ranking(ranking: Sequence[Hashable], positives: Iterable[Hashable], junk: Iterable[Hashable],
                   scores: Sequence[float] | None, ties: str) -> tuple[list[Hashable], list[int]]:
    """Junk-free ranking (ties resolved) and, for every kept item, its index in the input ranking."""
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    ranking = list(ranking)
    if len(set(ranking)) != len(ranking):
        raise ValueError("ranking contains duplicate ids")
    if scores is not None and len(scores) != len(ranking):
        raise ValueError(f"{len(scores)} scores for {len(ranking)} ranked ids")
    pos, junk_set = set(positives), set(junk)
    keep = [i for i, r in enumerate(ranking) if r not in junk_set]
    if scores is not None and ties != "given":
        # Sort by score (descending); inside a tie group put negatives first (pessimistic) or last.
        sign = 1 if ties == "pessimistic" else -1
        keep.sort(key=lambda i: (-float(scores[i]), sign * (ranking[i] in pos), i))
    return [ranking[i] for i in keep], keep


def positive_ranks(ranking: Sequence[Hashable], positives: Iterable[Hashable], junk: Iterable[Hashable] = (),
                   *, scores: Sequence[float] | None = None, ties: str = "pessimistic") -> np.ndarray:
    """0-based ranks of the retrieved positives after junk removal (and tie resolution), ascending."""
    pos = set(positives)
    clean, _ = _clean_ranking(ranking, pos, junk, scores, ties)
    return np.array([r for r, item in enumerate(clean) if item in pos], dtype=np.int64)


def _ap_from_ranks(ranks: np.ndarray, n_pos: int, variant: str, weights: np.ndarray | None = None) -> float:
    """AP from the sorted 0-based ranks of retrieved positives; `weights` (IoUs) scale each contribution."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    if n_pos == 0:
        return math.nan
    if len(ranks) == 0:
        return 0.0
    j = np.arange(1, len(ranks) + 1, dtype=np.float64)
    p1 = j / (ranks + 1.0)  # precision just after the j-th positive
    if variant == "standard":
        contrib = p1
    else:
        # revisitop compute_ap: trapezoid between the precision just before and just after the positive.
        p0 = np.where(ranks == 0, 1.0, (j - 1) / np.maximum(ranks, 1))
        contrib = (p0 + p1) / 2.0
    if weights is not None:
        contrib = contrib * weights
    return float(contrib.sum() / n_pos)


def average_precision(ranking: Sequence[Hashable], positives: Iterable[Hashable], junk: Iterable[Hashable] = (),
                      *, variant: str = "standard", scores: Sequence[float] | None = None,
                      ties: str = "pessimistic") -> float:
    """AP of one ranking (see the module docstring). ``variant``: "standard" (mean precision at each positive)
    or "roxford" (revisited Oxford/Paris trapezoid interpolation). ``nan`` when there are no positives."""
    pos = set(positives) - set(junk)
    return _ap_from_ranks(positive_ranks(ranking, pos, junk, scores=scores, ties=ties), len(pos), variant)


def _ranks_for_cutoff(ranking: Sequence[Hashable], positives: Iterable[Hashable], k: int, junk: Iterable[Hashable],
                      scores: Sequence[float] | None, ties: str) -> tuple[np.ndarray, int] | None:
    """(0-based ranks of the retrieved positives, number of positives) for the @k metrics; None without positives."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pos = set(positives) - set(junk)
    if not pos:
        return None
    return positive_ranks(ranking, pos, junk, scores=scores, ties=ties), len(pos)


def average_precision_at_k(ranking: Sequence[Hashable], positives: Iterable[Hashable], k: int,
                           junk: Iterable[Hashable] = (), *, scores: Sequence[float] | None = None,
                           ties: str = "pessimistic") -> float:
    """AP@k = sum of precision at each positive within the first k / min(n_pos, k); ``nan`` without positives."""
    found = _ranks_for_cutoff(ranking, positives, k, junk, scores, ties)
    if found is None:
        return math.nan
    ranks, n_pos = found
    ranks = ranks[ranks < k]
    j = np.arange(1, len(ranks) + 1, dtype=np.float64)
    return float((j / (ranks + 1.0)).sum() / min(n_pos, k))


def recall_at_k(ranking: Sequence[Hashable], positives: Iterable[Hashable], k: int,
                junk: Iterable[Hashable] = (), *, scores: Sequence[float] | None = None,
                ties: str = "pessimistic") -> float:
    """1.0 if a positive is among the first k (junk removed), else 0.0; ``nan`` without positives."""
    found = _ranks_for_cutoff(ranking, positives, k, junk, scores, ties)
    if found is None:
        return math.nan
    ranks, _ = found
    return float(len(ranks) > 0 and ranks[0] < k)


def loc_score(ranking: Sequence[Hashable], boxes: Sequence[Sequence[float] | None],
              positives: Iterable[Hashable], gt_boxes: Mapping[Hashable, Sequence[Sequence[float]]],
              junk: Iterable[Hashable] = (), *, variant: str = "standard", scores: Sequence[float] | None = None,
              ties: str = "pessimistic") -> float:
    """LocScore: AP whose per-positive precision is multiplied by the IoU of the winning box (``boxes[i]`` for
    ``ranking[i]``) with the best-matching ground-truth box of that image (``gt_boxes[id]``: one or more
    (x0, y0, x1, y1) boxes). Every positive must have ground-truth boxes; ``nan`` without positives."""
    pos = set(positives) - set(junk)
    if len(boxes) != len(ranking):
        raise ValueError(f"{len(boxes)} boxes for {len(ranking)} ranked ids")
    missing = [p for p in pos if not gt_boxes.get(p)]
    if missing:
        raise ValueError(f"positives without ground-truth boxes: {sorted(map(str, missing))[:5]}")
    clean, src = _clean_ranking(ranking, pos, junk, scores, ties)
    hits = [(r, src[r]) for r, item in enumerate(clean) if item in pos]
    ranks = np.array([r for r, _ in hits], dtype=np.int64)
    ious = np.array([best_iou(boxes[i], gt_boxes[ranking[i]]) for _, i in hits], dtype=np.float64)
    return _ap_from_ranks(ranks, len(pos), variant, ious)


def mean_average_precision(aps: Iterable[float]) -> float:
    """Mean over queries that have positives (``nan`` APs are skipped); ``nan`` if none has."""
    vals = np.array([a for a in aps], dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if len(vals) else math.nan


# --------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class QueryGroundTruth:
    """Ground truth of one query: relevant ids, junk ids and, per positive, its box(es) (x0, y0, x1, y1)."""

    positives: frozenset
    junk: frozenset = frozenset()
    boxes: Mapping[Hashable, tuple[Box, ...]] = field(default_factory=dict)

    @classmethod
    def coerce(cls, gt: "QueryGroundTruth | Mapping[str, Any]") -> "QueryGroundTruth":
        """Accepts a QueryGroundTruth or a dict with "positives", optional "junk" and "boxes"."""
        if isinstance(gt, QueryGroundTruth):
            return gt
        boxes = {k: tuple(_box(b) for b in _as_box_list(v)) for k, v in (gt.get("boxes") or {}).items()}
        return cls(frozenset(gt["positives"]), frozenset(gt.get("junk", ())), boxes)

    @property
    def has_boxes(self) -> bool:
        return bool(self.positives) and all(self.boxes.get(p) for p in self.positives - self.junk)


def _box(b: Sequence[float]) -> Box:
    x0, y0, x1, y1 = b
    return (x0, y0, x1, y1)


def _as_box_list(v: Any) -> list[Sequence[float]]:
    """One box or a list of boxes -> list of boxes."""
    arr = np.asarray(v, dtype=np.float64)
    return [tuple(b) for b in arr.reshape(-1, 4)] if arr.size else []


@dataclass(frozen=True)
class QueryEvaluation:
    query: Hashable
    ap: float
    loc_score: float
    ap_at_k: float
    recall: Mapping[int, float]
    n_positives: int


@dataclass
class RetrievalEvaluation:
    """Per-query results of `evaluate_rankings`; `summary()` aggregates them (queries without positives are
    skipped; LocScore only over queries whose positives all have boxes)."""

    queries: list[QueryEvaluation]
    map_k: int
    recall_ks: tuple[int, ...]
    variant: str = "standard"

    @property
    def ap(self) -> np.ndarray:
        return np.array([q.ap for q in self.queries], dtype=np.float64)

    @property
    def loc_score(self) -> np.ndarray:
        return np.array([q.loc_score for q in self.queries], dtype=np.float64)

    @property
    def r1(self) -> np.ndarray:
        return np.array([q.recall.get(1, math.nan) for q in self.queries], dtype=np.float64)

    @property
    def query_ids(self) -> list[Hashable]:
        return [q.query for q in self.queries]

    def summary(self) -> dict[str, float]:
        """{"mAP", "LocScore", "R@k" for each recall k (R@1, R@5 by default), "mAP@<map_k>", "n_queries"}."""
        out = {"mAP": mean_average_precision(self.ap), "LocScore": mean_average_precision(self.loc_score)}
        for k in self.recall_ks:
            out[f"R@{k}"] = mean_average_precision(q.recall[k] for q in self.queries)
        out[f"mAP@{self.map_k}"] = mean_average_precision(q.ap_at_k for q in self.queries)
        out["n_queries"] = float(sum(1 for q in self.queries if q.n_positives > 0))
        return out


def evaluate_rankings(rankings: Sequence[Sequence[Hashable]], boxes: Sequence[Sequence[Box | None]] | None,
                      groundtruth: Sequence["QueryGroundTruth | Mapping[str, Any]"], *,
                      scores: Sequence[Sequence[float]] | None = None, map_k: int = 100,
                      recall_ks: Sequence[int] = (1, 5, 10), variant: str = "standard", ties: str = "pessimistic",
                      query_ids: Sequence[Hashable] | None = None) -> RetrievalEvaluation:
    """Evaluate one ranking per query.

    rankings[q]: ranked database ids; boxes[q][i]: winning box of rankings[q][i] (or None / boxes=None when
    there are none: LocScore is then nan); groundtruth[q]: QueryGroundTruth or {"positives", "junk", "boxes"};
    scores[q][i] (optional) enable tie handling. Use `rankings_from_hits` to turn engine hits into these.
    """
    if len(rankings) != len(groundtruth):
        raise ValueError(f"{len(rankings)} rankings for {len(groundtruth)} ground truths")
    ks = tuple(sorted(set(int(k) for k in recall_ks) | {1}))
    out = []
    for q, ranking in enumerate(rankings):
        gt = QueryGroundTruth.coerce(groundtruth[q])
        sc = None if scores is None else scores[q]
        ap = average_precision(ranking, gt.positives, gt.junk, variant=variant, scores=sc, ties=ties)
        q_boxes = None if boxes is None else boxes[q]
        if q_boxes is not None and gt.has_boxes:
            loc = loc_score(ranking, q_boxes, gt.positives, gt.boxes, gt.junk, variant=variant, scores=sc, ties=ties)
        else:
            loc = math.nan
        out.append(QueryEvaluation(
            query=q if query_ids is None else query_ids[q], ap=ap, loc_score=loc,
            ap_at_k=average_precision_at_k(ranking, gt.positives, map_k, gt.junk, scores=sc, ties=ties),
            recall={k: recall_at_k(ranking, gt.positives, k, gt.junk, scores=sc, ties=ties) for k in ks},
            n_positives=len(gt.positives - gt.junk)))
    return RetrievalEvaluation(out, int(map_k), ks, variant)


def rankings_from_hits(hits_per_query: Sequence[Sequence[Any]], id_of=lambda hit: hit.image_id
                       ) -> tuple[list[list[Hashable]], list[list[Box | None]], list[list[float]]]:
    """Engine results (`patchify.engine.Hit`-like: .score, .box) -> (rankings, boxes, scores) for
    `evaluate_rankings`. ``id_of`` maps a hit to the ground truth's id (e.g. ``lambda h: index[h.path]``)."""
    rankings: list[list[Hashable]] = []
    boxes: list[list[Box | None]] = []
    scores: list[list[float]] = []
    for hits in hits_per_query:
        rankings.append([id_of(h) for h in hits])
        boxes.append([_box(h.box) if h.box is not None else None for h in hits])
        scores.append([float(h.score) for h in hits])
    return rankings, boxes, scores
