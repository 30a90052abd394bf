"""Metadata that scales: a 1,000-class dataset's per-class data and plots stay small.

Bounds (stated here, measured on 2 cores): the per-class table of `cde_classifier` under 256 KB
serialized (167 KB measured); every per-class table (`reporting.per_class_table`) at most
`TABLE_CLASSES` rows, the classes it ranks first; each PNG under 200 KB (heatmap 134 KB, bars 12 KB); drawing the heatmap
and the bar chart raises the peak RSS by under 150 MB (70 MB, 3.7 s measured; the uncapped heatmap of
397 classes took 7.1 GB).

Measured once end to end (not a test: 36 s), a 1,000-class copy of the demo dataset with tiny
models through `cde_pseudo_labels`: serialized materialization metadata 171 KB for `cde_classifier`
(the table), 65 KB for `cde_pseudo_labels`, 54 KB for `class_descriptions` (its per-class markdown),
16 KB for each of the others.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from dagster import TableMetadataValue
from dagster._serdes import serialize_value

from nola_assets import reporting
from nola_assets.text_assets import cde_class_table

CLASSES = [f"class {i:04d}" for i in range(1000)]
TABLE_BYTES = 256 * 1024
PNG_BYTES = 200 * 1024
DRAWING_RSS_MB = 150


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    vectors = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=1, keepdim=True)


def test_the_per_class_table_of_1000_classes_stays_small_and_names_each_class_nearest():
    cde = _unit(len(CLASSES), 512, seed=0)
    cde[7] = cde[3] * 0.99 + cde[7] * 0.01  # classes 3 and 7 are near twins
    cde = cde / cde.norm(dim=1, keepdim=True)
    texts = {c: [f"a photo of a {c}"] * 10 for c in CLASSES}
    table = cde_class_table(CLASSES, texts, _unit(len(CLASSES), 512, seed=1), cde)
    size = len(serialize_value(table))
    assert size < TABLE_BYTES, size
    rows = table.value.records
    assert len(rows) == len(CLASSES)
    assert rows[3].data["nearest class"] == CLASSES[7] and rows[7].data["nearest class"] == CLASSES[3]
    assert rows[3].data["cos(nearest)"] > 0.99


def test_per_class_tables_are_capped_to_the_classes_they_rank_first():
    classes = [f"class {i:05d}" for i in range(reporting.TABLE_CLASSES + 500)]
    images = [(i * 7919) % len(classes) for i in range(len(classes))]  # a known ranking, not the class order
    table = reporting.per_class_table({"class": classes, "images": images}, rank=images, ranked_by="most images first")
    assert isinstance(table, TableMetadataValue)
    rows = [record.data for record in table.records]
    assert len(rows) == reporting.TABLE_CLASSES
    assert sorted(row["images"] for row in rows) == list(range(500, len(classes)))  # the most images, none other
    assert [row["class"] for row in rows] == sorted(row["class"] for row in rows)  # kept in class order
    assert table.schema.columns[0].description == f"{reporting.TABLE_CLASSES} of {len(classes)} classes shown: most images first"
    assert len(serialize_value(table)) < TABLE_BYTES
    whole = reporting.per_class_table({"class": classes[:3], "images": images[:3]}, rank=images[:3])
    assert [r.data["class"] for r in whole.records] == classes[:3] and whole.schema.columns[0].description is None


def test_the_cde_table_of_many_classes_keeps_the_most_confused():
    classes = [f"class {i:05d}" for i in range(reporting.TABLE_CLASSES + 200)]
    cde = _unit(len(classes), 64, seed=0)
    cde[900] = cde[1100] * 0.99 + cde[900] * 0.01  # near twins, among the most confused classes
    cde = cde / cde.norm(dim=1, keepdim=True)
    table = cde_class_table(classes, {}, _unit(len(classes), 64, seed=1), cde)
    kept = {record.data["class"]: record.data for record in table.records}
    assert len(kept) == reporting.TABLE_CLASSES
    assert kept[classes[900]]["nearest class"] == classes[1100] and classes[1100] in kept


def test_the_class_similarity_heatmap_shows_the_most_confused_classes_first():
    similarity = np.eye(6) + 0.1
    similarity[2, 5] = similarity[5, 2] = 0.9
    similarity[0, 4] = similarity[4, 0] = 0.5
    assert reporting.most_confused(similarity, top=4).tolist() == [2, 5, 0, 4]


@pytest.mark.slow  # 10-15 s on 2 shared cores: a fresh process importing nola_assets, then 4 s of drawing
def test_plots_of_1000_classes_stay_small_and_cheap_to_draw():
    """Drawn in a fresh process, so the peak RSS it adds is this drawing's alone."""
    script = """
import json, resource, time
import numpy as np
from nola_assets import reporting
classes = [f"class {i:04d}" for i in range(1000)]
vectors = np.random.default_rng(0).standard_normal((1000, 512))
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
similarity = vectors @ vectors.T
reporting.bar_chart(["a", "b"], [1, 2], "warm-up", "n")  # matplotlib's own first-use allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
heatmap = reporting.class_similarity_heatmap(similarity, classes, "CDE class-class cosine")
bars = reporting.bar_chart(classes, list(range(1000)), "pseudo-labels per class", "images")
print(json.dumps({"rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                  "seconds": time.perf_counter() - started, "heatmap_bytes": len(heatmap), "bars_bytes": len(bars)}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    print(measured)
    assert measured["rss_mb"] < DRAWING_RSS_MB, measured
    assert measured["heatmap_bytes"] < PNG_BYTES and measured["bars_bytes"] < PNG_BYTES, measured
