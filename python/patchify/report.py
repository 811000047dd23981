"""Visual reports of search results and evaluations.

* `draw_results`: one PIL image, the query then the top-k results, each with its winning patch box (orange)
  and, when given, the ground-truth box(es) (green); captions carry rank, score, level and IoU.
* `save_report_png` / `save_report_html`: the same to a file; the HTML is self-contained (PNG as base64).
* `plot_levels`, `plot_ap_vs_locscore`: matplotlib charts (object-oriented API on the Agg canvas, so no GUI
  backend or pyplot global state is touched).
* `high_ap_low_loc`: queries that are retrieved well but localised badly (high AP, low LocScore) - the
  "right image for the wrong reason" diagnostic list.

Hits are anything with `.path`, `.score`, `.box` (x0, y0, x1, y1, original pixels, exclusive max) and
optionally `.level`, `.rank`, `.image_id` - `patchify.engine.Hit` or a stand-in.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .metrics import QueryEvaluation, RetrievalEvaluation, best_iou

Colour = tuple[int, int, int]
HIT_COLOUR: Colour = (255, 140, 0)  # winning patch
GT_COLOUR: Colour = (40, 200, 60)  # ground truth
QUERY_COLOUR: Colour = (60, 120, 255)
WRONG_COLOUR: Colour = (220, 30, 30)
CAPTION_HEIGHT = 36

def _open(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    with Image.open(image) as im:
        return ImageOps.exif_transpose(im).convert("RGB")  # boxes are in upright pixels, like the engine's


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _gt_for(groundtruth_boxes: Any, hit: Any, i: int) -> list:
    """Ground-truth boxes of hit i: from a sequence aligned with the hits, or a mapping keyed by the hit's
    path, image_id (or a Path of the path)."""
    if groundtruth_boxes is None:
        return []
    if isinstance(groundtruth_boxes, Mapping):
        for key in (getattr(hit, "path", None), getattr(hit, "image_id", None)):
            if key is not None and key in groundtruth_boxes:
                val = groundtruth_boxes[key]
                break
            if isinstance(key, str) and Path(key) in groundtruth_boxes:
                val = groundtruth_boxes[Path(key)]
                break
        else:
            return []
    else:
        val = groundtruth_boxes[i] if i < len(groundtruth_boxes) else None
    if val is None:
        return []
    arr = np.asarray(val, dtype=np.float64)
    return [tuple(b) for b in arr.reshape(-1, 4)] if arr.size else []


def _tile(img: Image.Image, boxes: Sequence[tuple[Sequence[float], Colour]], height: int, caption: str,
          border: Colour | None = None) -> Image.Image:
    """img scaled to `height` with boxes (original pixels) drawn in their colours and a caption strip."""
    scale = height / img.height
    thumb = img.resize((max(1, round(img.width * scale)), height), Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (thumb.width, height + CAPTION_HEIGHT), "white")
    tile.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(tile)
    width = max(2, height // 80)
    for box, colour in boxes:
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
    if border is not None:
        draw.rectangle([0, 0, tile.width - 1, height - 1], outline=border, width=width + 1)
    draw.multiline_text((3, height + 2), caption, fill="black", font=_font(), spacing=2)
    return tile


def draw_results(query_image: Any, hits: Sequence[Any], *, groundtruth_boxes: Any = None, k: int = 5,
                 query_box: Sequence[float] | None = None, relevant: Any = None, height: int = 200,
                 gap: int = 8) -> Image.Image:
    """The query then the top-k hits in one row.

    groundtruth_boxes: per-hit ground truth, either a sequence aligned with `hits` (None or one/several boxes
    each) or a mapping from hit path / image_id to boxes. query_box: the object's box in the query.
    relevant: optional set of paths / image ids; such hits get a green frame, the others a red one.
    """
    tiles = [_tile(_open(query_image), [(query_box, QUERY_COLOUR)] if query_box is not None else [], height,
                   "query")]
    for i, hit in enumerate(list(hits)[:k]):
        gts = _gt_for(groundtruth_boxes, hit, i)
        boxes: list[tuple[Sequence[float], Colour]] = [(g, GT_COLOUR) for g in gts]
        if getattr(hit, "box", None) is not None:
            boxes.append((hit.box, HIT_COLOUR))
        caption = f"#{int(getattr(hit, 'rank', i)) + 1}  {float(hit.score):.3f}"  # Hit.rank is 0-based
        if getattr(hit, "level", None) is not None:
            caption += f"  L{hit.level}"
        if gts and getattr(hit, "box", None) is not None:
            caption += f"\nIoU {best_iou(hit.box, gts):.2f}"
        border = None
        if relevant is not None:
            ok = getattr(hit, "path", None) in relevant or getattr(hit, "image_id", None) in relevant
            border = GT_COLOUR if ok else WRONG_COLOUR
        tiles.append(_tile(_open(hit.path), boxes, height, caption, border))
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, height + CAPTION_HEIGHT), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + gap
    return sheet


def save_report_png(path: str | os.PathLike, query_image: Any, hits: Sequence[Any], **kwargs: Any) -> Path:
    """`draw_results(query_image, hits, **kwargs)` saved as PNG."""
    path = Path(path)
    draw_results(query_image, hits, **kwargs).save(path, "PNG")
    return path


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _is_hit_list(hits: Any) -> bool:
    return len(hits) == 0 or hasattr(hits[0], "score")


def save_report_html(path: str | os.PathLike, query_image: Any, hits: Sequence[Any], *,
                     groundtruth_boxes: Any = None, k: int = 5, title: str = "Patchify search results",
                     summary: Mapping[str, object] | None = None, **kwargs: Any) -> Path:
    """Self-contained HTML (images embedded as base64 PNG, no external files): optional summary table, then per
    query the `draw_results` strip and a table of its top-k hits. For several queries pass lists:
    query_image=[q0, q1, ...], hits=[hits0, hits1, ...], groundtruth_boxes=[gt0, gt1, ...] (or None)."""
    if _is_hit_list(hits):
        queries, hit_lists, gts = [query_image], [hits], [groundtruth_boxes]
    else:
        queries, hit_lists = list(query_image), list(hits)
        gts = list(groundtruth_boxes) if groundtruth_boxes is not None else [None] * len(queries)
        if not len(queries) == len(hit_lists) == len(gts):
            raise ValueError("query_image, hits and groundtruth_boxes must have one entry per query")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(key))}</th>" for key in summary) + "</tr><tr>"
                     + "".join(f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
                               for v in summary.values()) + "</tr></table>")
    for n, (q, hs, gt) in enumerate(zip(queries, hit_lists, gts, strict=True)):
        name = os.fspath(q) if isinstance(q, (str, os.PathLike)) else f"query {n}"
        strip = draw_results(q, hs, groundtruth_boxes=gt, k=k, **kwargs)
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='results' src='{_png_data_uri(strip)}'>")
        rows = ["<tr><th>rank</th><th>score</th><th>image</th><th>box</th><th>level</th><th>IoU</th></tr>"]
        for i, h in enumerate(list(hs)[:k]):
            g = _gt_for(gt, h, i)
            iou = f"{best_iou(h.box, g):.3f}" if g and h.box is not None else ""
            rows.append(f"<tr><td>{int(getattr(h, 'rank', i)) + 1}</td><td>{float(h.score):.4f}</td>"
                        f"<td>{html.escape(str(h.path))}</td>"
                        f"<td>{html.escape(str(tuple(h.box)) if h.box is not None else '')}</td>"
                        f"<td>{html.escape(str(getattr(h, 'level', '')))}</td><td>{iou}</td></tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- charts
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _summary(value: Any) -> Mapping[str, float]:
    return value.summary() if isinstance(value, RetrievalEvaluation) else value


def plot_levels(summary_by_level: Mapping[Any, Any], path: str | os.PathLike) -> Path:
    """Grouped bars of mAP and LocScore per level. summary_by_level: level label (0, 1, "L0+L1", ...) ->
    `RetrievalEvaluation` or its `summary()` dict. Saved as PNG (or any format matplotlib infers from path)."""
    labels = [f"L{key}" if isinstance(key, (int, np.integer)) else str(key) for key in summary_by_level]
    sums = [_summary(v) for v in summary_by_level.values()]
    x = np.arange(len(labels))
    fig = _figure(max(4.0, 1.2 * len(labels) + 2), 3.6)
    ax = fig.add_subplot()
    for off, key, colour in ((-0.2, "mAP", "tab:blue"), (0.2, "LocScore", "tab:orange")):
        vals = np.array([float(s.get(key, math.nan)) for s in sums])
        bars = ax.bar(x + off, np.nan_to_num(vals), 0.4, label=key, color=colour)
        ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.2f}" for v in vals], fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.25)  # headroom for the value labels and the legend above the bars
    ax.set_ylabel("score")
    ax.set_title("mAP and LocScore per level")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def high_ap_low_loc(evaluation: RetrievalEvaluation, ap_min: float = 0.8, loc_max: float = 0.3
                    ) -> list[QueryEvaluation]:
    """Queries with AP >= ap_min but LocScore <= loc_max: found, but by a patch that does not cover the object
    (context, background or a lucky crop). Sorted by the gap AP - LocScore, largest first."""
    picked = [q for q in evaluation.queries
              if not math.isnan(q.ap) and not math.isnan(q.loc_score) and q.ap >= ap_min and q.loc_score <= loc_max]
    return sorted(picked, key=lambda q: q.loc_score - q.ap)


def plot_ap_vs_locscore(evaluation: RetrievalEvaluation, path: str | os.PathLike, *, ap_min: float = 0.8,
                        loc_max: float = 0.3, annotate: int = 5) -> Path:
    """Per-query scatter of AP (x) against LocScore (y). LocScore <= AP always, so points sit under the
    diagonal; the shaded corner is the `high_ap_low_loc` region, whose worst `annotate` queries are labelled."""
    ap, loc = evaluation.ap, evaluation.loc_score
    ok = ~(np.isnan(ap) | np.isnan(loc))
    fig = _figure(4.6, 4.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="LocScore = AP")
    ax.fill_between([ap_min, 1.0], 0, loc_max, color="tab:red", alpha=0.12, label="high AP, low LocScore")
    ax.scatter(ap[ok], loc[ok], s=14, alpha=0.75, color="tab:blue")
    for q in high_ap_low_loc(evaluation, ap_min, loc_max)[:annotate]:
        ax.annotate(str(q.query), (q.ap, q.loc_score), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("AP")
    ax.set_ylabel("LocScore")
    ax.set_title(f"{int(ok.sum())} queries")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
