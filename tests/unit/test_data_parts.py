"""The streamed data path's pure parts: cutting a source into parts, reading one part, and the
split and sample by document-id hash (no Ray: planning scans files in this process)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.config import DataConfig
from raykd.data import hash_split, in_sample, load_documents, plan_parts, read_part, select_split


def _cfg(source: str, path, **kw) -> DataConfig:
    return DataConfig(source=source, path=str(path), **kw)


def _write_jsonl(path, rows, blank_every: int = 0):
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == 0:
            lines.append("")  # blank lines are not rows
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_parts_are_row_ranges_whose_union_is_the_file(tmp_path):
    rows = [{"text": f"doc {i} " + "x" * i} for i in range(10)]
    path = _write_jsonl(tmp_path / "c.jsonl", rows, blank_every=3)
    cfg = _cfg("jsonl", path, part_docs=3)
    parts = plan_parts(cfg)
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    read = [read_part(p, cfg) for p in parts]
    assert [i for r in read for i in r["doc_id"]] == [f"c.jsonl:{i}" for i in range(10)]
    assert [t for r in read for t in r["text"]] == [r["text"] for r in rows]
    assert [d.text for d in load_documents(cfg)] == [r["text"] for r in rows]


def test_a_bad_line_in_a_later_part_names_its_line_number(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\nnot json\n')
    cfg = _cfg("jsonl", path, part_docs=2)
    with pytest.raises(ValueError, match=r"b\.jsonl:5 \(row 3\) is not valid JSON"):
        load_documents(cfg)


def test_parquet_parts_cut_across_row_groups(tmp_path):
    table = pa.table({"uid": [f"u{i}" for i in range(11)], "text": [f"t{i}" for i in range(11)]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=4)
    cfg = _cfg("parquet", tmp_path / "p.parquet", id_column="uid", part_docs=5)
    parts = plan_parts(cfg)
    assert [(p.start, p.stop) for p in parts] == [(0, 5), (5, 10), (10, 11)]
    assert list(read_part(parts[1], cfg)["doc_id"]) == [f"u{i}" for i in range(5, 10)]


def test_changed_input_gives_new_part_digests_and_new_files_new_parts(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    cfg = _cfg("jsonl", tmp_path, part_docs=1)
    before = {p.part_id: p.digest() for p in plan_parts(cfg)}
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "three"}])
    after = {p.part_id: p.digest() for p in plan_parts(cfg)}
    assert set(before.items()) < set(after.items())  # a new file adds parts, old ones keep their digest
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "one!"}, {"text": "two"}])
    changed = {p.part_id: p.digest() for p in plan_parts(cfg)}
    assert changed["a.jsonl:0-1"] != before["a.jsonl:0-1"] and changed["b.jsonl:0-1"] == after["b.jsonl:0-1"]


def test_text_folder_one_document_per_file(tmp_path):
    for rel, text in (("x/1.txt", "first"), ("x/2.txt", "second"), ("y/1.txt", "third"), ("y/skip.md", "no")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    cfg = _cfg("text", tmp_path, part_docs=2)
    assert len(plan_parts(cfg)) == 2
    assert [(d.doc_id, d.text) for d in load_documents(cfg)] == [("x/1", "first"), ("x/2", "second"), ("y/1", "third")]


def test_missing_text_column_is_named_at_planning(tmp_path):
    path = _write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "body": "x"}])
    with pytest.raises(ValueError, match="no column 'text'.*'body'"):
        plan_parts(_cfg("jsonl", path))


def test_hash_split_is_stable_proportional_and_seeded():
    ids = [f"doc-{i}" for i in range(20_000)]
    splits = {"train": 0.7, "eval": 0.2, "test": 0.1}
    a = hash_split(ids, splits, seed=0)
    assert (a == hash_split(list(reversed(ids)), splits, seed=0)[::-1]).all()  # order does not matter
    for name, frac in splits.items():
        assert abs((a == name).mean() - frac) < 0.015
    assert (a != hash_split(ids, splits, seed=1)).mean() > 0.3  # another seed, another split


def test_smaller_sample_is_a_subset_and_independent_of_the_split():
    ids = [f"d{i}" for i in range(20_000)]
    small, large = in_sample(ids, 0.1, 0), in_sample(ids, 0.3, 0)
    assert not (small & ~large).any() and abs(small.mean() - 0.1) < 0.01
    train = select_split(ids, "train", {"train": 0.5, "eval": 0.5}, 0.3, 0)
    assert abs(train.sum() / large.sum() - 0.5) < 0.03  # the sample keeps the split's proportions
    assert not (train & ~large).any()


def test_split_fractions_must_sum_to_one_and_replaced_fields_say_what_instead():
    with pytest.raises(ValueError, match="sum to 0.9"):
        DataConfig(splits={"train": 0.8, "eval": 0.1})
    with pytest.raises(ValueError, match="data.test_docs was replaced by data.splits"):
        DataConfig.model_validate({"test_docs": 80})
    with pytest.raises(ValueError, match="data.max_docs was replaced by data.sample"):
        DataConfig.model_validate({"max_docs": 400})
    assert np.isclose(sum(DataConfig().splits.values()), 1.0)
