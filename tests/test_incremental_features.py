"""update_feature_table: only images the previous table lacks are computed; removed ones drop out."""

import torch

from nola_core.data import ImageRecord
from nola_core.features import FeatureTable, update_feature_table


def _records(*ids):
    return [ImageRecord(image_id=i, path=f"unlabeled/{i}.png") for i in ids]


def _fake_extract(calls, unreadable=()):
    def extract(records):
        calls.append([r.image_id for r in records])
        kept = [r.image_id for r in records if r.image_id not in unreadable]
        features = torch.tensor([[float(ord(i[0])), 1.0] for i in kept], dtype=torch.float16)
        return FeatureTable(ids=tuple(kept), features=features,
                            failed=tuple(r.image_id for r in records if r.image_id in unreadable))

    return extract


def test_first_table_computes_everything_in_record_order():
    calls = []
    table, computed = update_feature_table(None, _records("a", "b", "c"), _fake_extract(calls))
    assert computed == 3 and calls == [["a", "b", "c"]]
    assert table.ids == ("a", "b", "c")
    assert table.features[:, 0].tolist() == [97.0, 98.0, 99.0]


def test_only_new_images_are_computed_and_removed_ones_drop_out():
    calls = []
    previous, _ = update_feature_table(None, _records("a", "b", "c"), _fake_extract(calls))
    calls.clear()
    table, computed = update_feature_table(previous, _records("d", "a", "c"), _fake_extract(calls))
    assert computed == 1 and calls == [["d"]]
    assert table.ids == ("d", "a", "c")  # record order, "b" gone
    assert table.features[:, 0].tolist() == [100.0, 97.0, 99.0]
    assert table.features.dtype == torch.float16


def test_unchanged_records_compute_nothing_and_failures_are_retried():
    calls = []
    previous, _ = update_feature_table(None, _records("a", "b"), _fake_extract(calls, unreadable={"b"}))
    assert previous.ids == ("a",) and previous.failed == ("b",)
    calls.clear()
    same, computed = update_feature_table(previous, _records("a"), _fake_extract(calls))
    assert computed == 0 and calls == [] and same.ids == ("a",)
    retried, computed = update_feature_table(previous, _records("a", "b"), _fake_extract(calls))
    assert computed == 1 and retried.ids == ("a", "b") and retried.failed == ()
