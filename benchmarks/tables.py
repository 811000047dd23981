"""Markdown tables of the suite's JSON results (used by run.py; one function per benchmark).

Every section states the command, machine and date of its run; figures are shown next to ratios against the
baseline measured in the same run, since absolute times on a shared machine are noisy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

STAGES = ("decode", "tile", "encode", "index", "other")


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.0f}"


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def tiler(data: dict) -> list[str]:
    rows = [[f"L{r['level']}", str(r["patches"]), f"{r['pillow_patches_per_s']:.0f}",
             f"{r['cpp_1thread_patches_per_s']:.0f}", f"{r['cpp_2threads_patches_per_s']:.0f}",
             f"**{_x(r['speedup_1thread'])}**", _x(r["speedup_2threads"]), f"{r['max_abs_diff']:.2g}"]
            for r in data["results"]]
    return [f"{data['photos']} photos, {data['input_size']} px {data['interpolation']}, patches/s, "
            "ratios vs the Pillow per-patch reference.", ""] + _table(
        ["level", "patches", "Pillow", "C++ 1 thread", "C++ 2 threads", "1 thread / Pillow", "2 threads / Pillow",
         "max abs diff"], rows)


def flat(data: dict) -> list[str]:
    cfg = data["config"]
    rows = []
    batch_key = f"batch{cfg['batch']}_qps"
    for dtype, e in data["dtypes"].items():
        ours = e["flat"]
        vs = [f"{name}: {_x(s['batch1_p50'])} / {_x(s[batch_key])}"
              for name, s in ((n, e.get(f"speedup_vs_{n}")) for n in ("numpy", "faiss")) if s]
        rows.append([dtype, f"{_ms(ours['batch1']['p50_ms'])} / {_ms(ours['batch1']['p99_ms'])}",
                     f"{ours['batch']['queries_per_s']:.0f}",
                     f"{_ms(e['bandwidth_bound_ms'])} ms -> {_x(ours['batch1_p50_over_bound'])}", "; ".join(vs)])
    return [f"{cfg['images']} images x {cfg['patches']} patches x {cfg['dim']}-d, k = {cfg['k']}, "
            f"{cfg['threads']} threads; bandwidth {data['bandwidth']['gbs']:.1f} GB/s (numpy sum, same run). "
            f"Speed-ups = baseline time / ours (batch 1 p50, batch {cfg['batch']} queries/s).", ""] + _table(
        ["dtype", "batch 1 p50 / p99 ms", f"batch {cfg['batch']} q/s", "p50 / bandwidth bound",
         "faster than (batch 1 / batch)"], rows)


def ivfpq(data: dict) -> list[str]:
    cfg, res, ratio = data["config"], data["results"], data["ratios"]
    names = {"fused": "fused (ours)", "faiss_k10": "(a) faiss k=10 patches",
             "faiss_kprime_group": f"(b) faiss k'={cfg['k_prime']} + group-by"}
    rows = [[label, f"{_ms(res[n]['p50_ms'])} / {_ms(res[n]['p99_ms'])}", f"{res[n]['batch_qps']:.0f}",
             _x(res[n]["p50_ms"] / res["fused"]["p50_ms"]), _x(res["fused"]["batch_qps"] / res[n]["batch_qps"])]
            for n, label in names.items()]
    return [f"{cfg['images']} images x {cfg['patches_per_image']} patches, d={cfg['dim']}, nlist {cfg['nlist']}, "
            f"PQ{cfg['m']}x8, nprobe {cfg['nprobe']}, k = {cfg['k']}. Ratios: how much faster the fused scanner "
            f"is (fused within 1.3x of (a): latency {_x(ratio['fused_over_a_p50'])}).", ""] + _table(
        ["method", "batch 1 p50 / p99 ms", f"batch {cfg['batch']} q/s", "p50 / fused p50", "fused q/s / q/s"], rows)


def indexing(data: dict) -> list[str]:
    enc = data["encoders"]
    lines = []
    for name, label in (("real", "real backbone"), ("cheap", "cheap thumbnail-like encoder")):
        if name not in enc:
            continue
        what = f"{enc[name].get('backbone', '')} ".lstrip()
        lines += ["", f"**{label}** {what}({enc[name]['images']} photos; share of wall-clock time per stage; "
                  "decode = time the main thread waited for decoded images, decode cpu = summed over the worker "
                  "threads):", ""]
        rows = [[f"L{r['level']}", str(r["patches"] // max(r["images"], 1)), f"{r['images_per_s']:.2f}",
                 f"{r['patches_per_s']:.1f}", *[f"{r['share'][s] * 100:.1f}%" for s in STAGES],
                 f"{r['timings'].get('decode_cpu', 0.0):.2f} s"] for r in enc[name]["rows"]]
        lines += _table(["level", "patches/img", "images/s", "patches/s", *STAGES, "decode cpu"], rows)
    if "cheap_over_real_images_per_s" in data:
        ratio = data["cheap_over_real_images_per_s"]
        lines += ["", "Images/s, cheap encoder / real backbone (how much faster indexing gets once the encoder is "
                  "free; the rest is the engine's own overhead): "
                  + ", ".join(f"L{level} {_x(v)}" for level, v in ratio.items())]
    return lines[1:]


def search_scaling(data: dict) -> list[str]:
    ok = [r for r in data["rows"] if "skipped" not in r]
    batch = ok[0]["batch"] if ok else 64
    rows = []
    for r in ok:
        vs = "; ".join(f"{name}: {_x(s['batch1_p50'])} / {_x(s['batch_qps'])}" for name, s in r["speedup"].items())
        rows.append([f"{r['images']:,}", f"L{r['level']} ({r['patches']})", r["kind"],
                     f"{_ms(r['ours']['batch1']['p50_ms'])} / {_ms(r['ours']['batch1']['p99_ms'])}",
                     f"{r['ours']['batch']['queries_per_s']:.0f}", vs])
    lines = ["Synthetic clustered L2-normalised vectors, k = 10. Flat batch 1 on all threads, IVFPQ batch 1 on one "
             "(as faiss). Speed-ups = baseline time / ours (batch 1 p50 / batch queries/s), baselines in the same "
             "process: numpy = matmul + per-image max; faiss_flat_group = faiss IndexFlatIP (f16: SQfp16) top "
             "k x patches + group-by; faiss_ivfpq_group = the same faiss IVFPQ index, smallest k' giving the same "
             "top-10 images + group-by.", ""]
    lines += _table(["images", "level (patches)", "index", "batch 1 p50 / p99 ms", f"batch {batch} q/s",
                     "faster than (batch 1 / batch)"], rows)
    mem = [[f"{r['images']:,}", f"L{r['level']} ({r['patches']})", r["kind"], f"{r['bytes_per_image']:,.0f}",
            f"{(r['index_nbytes'] + r.get('fixed_bytes', 0)) / 2**20:,.1f}",
            f"{r['build_peak_rss_bytes'] / 2**20:,.1f}",
            f"{r['search_peak_rss_bytes'] / 2**20:,.1f}", f"{r['build_seconds']:.1f}"] for r in ok]
    lines += ["", "Memory (each configuration in its own process; peaks relative to RSS just before building / "
              "searching, the raw vectors already resident; IVFPQ bytes/image exclude the fixed centroids and "
              "codebooks, which are in index MiB):", ""]
    lines += _table(["images", "level (patches)", "index", "bytes/image", "index MiB", "build peak MiB",
                     "search peak MiB", "build s"], mem)
    skipped = [r for r in data["rows"] if "skipped" in r]
    if skipped:
        lines += [""] + [f"- not measured: {r['images']:,} images L{r['level']} {r['kind']}: {r['skipped'][:200]}"
                         for r in skipped]
    return lines


def ray(data: dict) -> list[str]:
    lines: list[str] = []
    for part, label in (("index_cheap", "cheap encoder"), ("index_real", "real backbone")):
        if part not in data:
            continue
        rows = []
        for name, r in data[part].items():
            sizes = [k for k in r if k.startswith("seconds_")]
            rows.append([name, " / ".join(f"{r[k]:.2f}" for k in sizes), f"{r['images_per_s']:.1f}",
                         _x(r["vs_in_process"]), f"{r['marginal_ms_per_image']:.2f}" if "marginal_ms_per_image" in r
                         else "-", f"{r['fixed_s']:.2f}" if "fixed_s" in r else "-"])
        sizes = " / ".join(k.split("_")[1] for k in next(iter(data[part].values())) if k.startswith("seconds_"))
        lines += ["", f"Indexing, {label} (seconds for {sizes} images; marginal = per image between the sizes):", ""]
        lines += _table(["configuration", "seconds", "images/s", "vs in-process", "marginal ms/image", "fixed s"],
                        rows)
    for part, label in (("search", "flat"), ("search_ivfpq", "IVFPQ")):
        if part not in data:
            continue
        rows = [[name, _ms(r["p50_ms"]), _ms(r["p99_ms"]), str(r.get("equal_to_single", "-")),
                 " + ".join(f"{v:.1f}" for v in r.get("shard_search_mean_ms", [])) or "-",
                 f"{r['merge_mean_ms']:.2f}" if "merge_mean_ms" in r else "-",
                 f"{r['ray_round_trip_min_ms']:.2f}" if r.get("ray_round_trip_min_ms") else "-"]
                for name, r in data[part].items() if isinstance(r, dict)]
        lines += ["", f"Search, {label}, one query, k = 10 (shard search: each shard alone, in process):", ""]
        lines += _table(["configuration", "p50 ms", "p99 ms", "equal to single", "shard search ms", "merge ms",
                         "Ray round trip ms"], rows)
    return lines[1:]


SECTIONS: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "indexing": ("Indexing end to end per grid level", indexing),
    "search_scaling": ("Search vs database size and grid level", search_scaling),
    "tiler": ("Tiler: C++ vs Pillow per patch", tiler),
    "flat": ("Flat index: exact max-over-patches search", flat),
    "ivfpq": ("IVFPQ: fused max-over-patches scanner vs faiss", ivfpq),
    "ray": ("Sharded index on Ray: indexing vs encoder actors, search vs shards", ray),
}


def suite_markdown(runs: dict[str, Any], out: Path) -> str:
    """SUITE.md: one section per benchmark that has a run record and a JSON file in `out`."""
    lines = ["# Benchmark suite results", "", "Written by `benchmarks/run.py`; raw figures in the `suite_*.json` "
             "next to this file. Timings on a shared machine are noisy: compare the ratios within one run.", ""]
    for name, (title, render) in SECTIONS.items():
        run = runs.get(name)
        path = out / f"suite_{name}.json"
        if run is None:
            continue
        lines += [f"## {title} ({run['date'][:10]})", "", "```", run["command"], "```", "",
                  f"Machine: {run.get('machine', '?')}; load average {run['load_average_before']:.1f} at the start; "
                  f"{run['date']} UTC; {run['seconds']:.0f} s.", ""]
        if not path.exists():
            lines += [f"Not measured: {run.get('status')}.", ""]
            continue
        if run.get("status") != "ok":  # e.g. stopped at the time limit after writing some rows
            lines += [f"Incomplete ({run.get('status')}): the figures it wrote before stopping.", ""]
        try:
            lines += render(json.loads(path.read_text())) + [""]
        except (KeyError, ValueError, ZeroDivisionError) as exc:  # a partial file of a benchmark that died
            lines += [f"Not measured: {run.get('status')}; its JSON is incomplete ({exc!r}).", ""]
    return "\n".join(lines)
