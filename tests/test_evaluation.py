"""`patchify eval`'s engine: per-level evaluation on a tiny composite benchmark with the thumbnail test encoder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from patchify.cli import main
from patchify.datasets import build_composite_benchmark
from patchify.evaluation import evaluate_levels, write_outputs
from patchify.images import load_rgb


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    return build_composite_benchmark(tmp_path_factory.mktemp("bench") / "composite", n_objects=3,
                                     positives_per_object=2, n_distractors=4, seed=3, image_size=(256, 192))


def test_levels_are_evaluated_from_one_encoding(tiny_benchmark, thumbnail_backbone, tmp_path):
    run = evaluate_levels(tiny_benchmark, backbone=thumbnail_backbone, levels=[0, 2], indexes=["flat"],
                          embedding_cache=tmp_path / "cache", progress=False, log=lambda _: None)
    assert [(r.index, r.level) for r in run.results] == [("flat", 0), ("flat", 2)]
    n_db = len(tiny_benchmark.database)
    assert [r.n_patches for r in run.results] == [n_db, 14 * n_db]
    # The database is encoded once (at L2); the L0 index gets the L2 encoding's grid-1 rows. One more pass
    # encodes the 4x4 cells the whitening learns from (not indexed at L2), once for both levels.
    assert thumbnail_backbone.calls <= 2 * (1 + n_db) + 1  # batches of the two passes + one query batch
    calls = thumbnail_backbone.calls
    evaluate_levels(tiny_benchmark, backbone=thumbnail_backbone, levels=[1], embedding_cache=tmp_path / "cache",
                    progress=False, log=lambda _: None)
    assert thumbnail_backbone.calls == calls + 1  # only the queries are encoded again
    for r in run.results:
        s = r.summary
        assert 0.0 <= s["LocScore"] <= s["mAP"] <= 1.0
        assert s["n_queries"] == tiny_benchmark.n_queries
        assert len(r.evaluation.queries) == tiny_benchmark.n_queries

    written = write_outputs(run, tmp_path / "out", tiny_benchmark)
    data = json.loads(written["json"].read_text())
    assert [r["level"] for r in data["results"]] == [0, 2]
    assert "flat_L2" in data["high_ap_low_locscore"]
    page = written["report"].read_text()
    assert page.count("<h2>") == min(4, tiny_benchmark.n_queries) and "data:image/png;base64," in page
    assert written["levels_flat"].stat().st_size > 1000 and written["ap_vs_loc_flat"].stat().st_size > 1000
    table = run.table()
    assert "L0" in table and "L2" in table and "LocScore" in table


def test_each_database_image_is_read_and_encoded_once_without_a_cache(tiny_benchmark, thumbnail_backbone,
                                                                     monkeypatch):
    import patchify.encoder

    reads = []
    real_load = patchify.encoder.load_rgb
    monkeypatch.setattr(patchify.encoder, "load_rgb", lambda source: reads.append(source) or real_load(source))
    run = evaluate_levels(tiny_benchmark, backbone=thumbnail_backbone, levels=[0, 1, 2, 3], embedding_cache=False,
                          progress=False, log=lambda _: None)
    n_db = len(tiny_benchmark.database)
    assert len([r for r in reads if not hasattr(r, "shape")]) == n_db + 0 * len(run.results)
    assert [r.n_patches for r in run.results] == [n_db, 5 * n_db, 14 * n_db, 30 * n_db]


def test_evaluation_matches_the_metrics_on_engine_hits(tiny_benchmark, thumbnail_backbone, tmp_path):
    from patchify import Patchify
    from patchify.metrics import average_precision

    run = evaluate_levels(tiny_benchmark, backbone=thumbnail_backbone, levels=[1], progress=False,
                          embedding_cache=tmp_path / "cache", log=lambda _: None)
    engine = Patchify(backbone=thumbnail_backbone, level=1)
    engine.add_images([str(p) for p in tiny_benchmark.database])
    # Queries are cut to their object box, as the benchmark's protocol says.
    queries = [tiny_benchmark.query_image(q) for q in range(tiny_benchmark.n_queries)]
    assert queries[0].shape[:2] != load_rgb(tiny_benchmark.queries[0]).shape[:2]
    hits = engine.search_batch(queries, k=len(tiny_benchmark.database))
    for q, per_query in enumerate(run.results[0].evaluation.queries):
        ranking = [tiny_benchmark.index_of(h.path) for h in hits[q]]
        expected = average_precision(ranking, tiny_benchmark.positives[q], tiny_benchmark.junk[q],
                                     scores=[h.score for h in hits[q]])
        assert np.isclose(per_query.ap, expected)


def test_bad_arguments_are_clear(tiny_benchmark, thumbnail_backbone, tmp_path, capsys):
    with pytest.raises(ValueError, match="levels"):
        evaluate_levels(tiny_benchmark, backbone=thumbnail_backbone, levels=[], progress=False)
    assert main(["eval", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no composite benchmark here" in capsys.readouterr().err
