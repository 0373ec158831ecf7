"""The soft-label cache as parts plus a ledger: commit, resume bookkeeping, and refusal of bad caches."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from raykd.soft_labels.cache import (
    CacheError,
    CacheKey,
    cache_dir_for,
    done_parts,
    finalize,
    ledger_file,
    open_cache,
    read_entry,
    remove_partials,
    write_part,
)
from raykd.soft_labels.schema import SCHEMA_VERSION, encode_batch, soft_label_schema

B, T, K, V = 3, 8, 4, 100


def _key(**changes) -> CacheKey:
    base = CacheKey("w", "t", "hf", "float32", K, 1.0, "data", T, 1, 2)
    return replace(base, **changes)


def _table(key: CacheKey, seed: int = 0, real: int = T):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), dtype=np.uint8)
    mask[:, :real] = 1
    loss = np.zeros_like(mask)
    loss[:, :-1] = mask[:, 1:]
    block = {"doc_id": np.array([f"d{seed}-{i}" for i in range(B)], dtype=object), "block_index": np.zeros(B, np.int32),
             "input_ids": rng.integers(0, V, (B, T)).astype(np.int32), "attention_mask": mask, "loss_mask": loss}
    logits = rng.normal(size=(B, T, V))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, -1)[..., :K]
    top = np.take_along_axis(logp, ids, -1)
    labels = {"topk_ids": ids.astype(np.uint16), "topk_logprobs": top.astype(np.float32),
              "tail_logmass": np.log1p(-np.exp(top).sum(-1)).astype(np.float32),
              "label_logprobs": np.full((B, T), -1.0, np.float32)}
    schema = soft_label_schema(T, K, V, {"cache_key": key.digest()})
    return encode_batch(block, labels, schema)


def _commit_two_parts(tmp_path, key=None):
    key = key or _key()
    folder = cache_dir_for(tmp_path, key)
    write_part(folder, key, "p0", _table(key, 0), part_id="f:0-3", doc_ids=["d0-0", "d0-1", "d0-2"], teacher_calls=2)
    write_part(folder, key, "p1", _table(key, 1, real=5), part_id="f:3-6", doc_ids=["d1-0", "d1-1", "d1-2"], teacher_calls=1)
    write_part(folder, key, "p2", None, part_id="f:6-9", doc_ids=[])  # a part with no rows of this split
    return key, folder


def test_parts_commit_then_finalize_counts_every_part(tmp_path):
    key, folder = _commit_two_parts(tmp_path)
    assert done_parts(folder) == {"p0", "p1", "p2"}
    m = finalize(folder, key, ["p0", "p1", "p2"], {"model": "tiny"}, 1.5)
    assert (m.rows, m.docs, m.teacher_calls) == (2 * B, 2 * B, 3)
    assert m.tokens == B * T + B * 5 and m.loss_tokens == B * (T - 1) + B * 4
    assert len(m.shards) == 2 and m.parts == ["p0", "p1", "p2"]
    assert open_cache(folder, expect=key, deep=True, parts=["p2", "p1", "p0"]).key == key.digest()


def test_finalize_refuses_while_a_planned_part_is_missing(tmp_path):
    key, folder = _commit_two_parts(tmp_path)
    with pytest.raises(CacheError, match="1 of 4 parts .* not labeled yet"):
        finalize(folder, key, ["p0", "p1", "p2", "p3"], {}, 0.0)


def test_a_finished_part_is_never_rewritten(tmp_path):
    key, folder = _commit_two_parts(tmp_path)
    before = (tmp_path / key.digest() / "parts" / "p0.parquet").read_bytes()
    with pytest.raises(CacheError, match="already committed"):
        write_part(folder, key, "p0", _table(key, 9), part_id="f:0-3")
    assert (tmp_path / key.digest() / "parts" / "p0.parquet").read_bytes() == before


def test_ledger_entry_of_another_key_is_refused(tmp_path):
    key, folder = _commit_two_parts(tmp_path)
    entry = json.loads((tmp_path / key.digest() / "ledger" / "p1.json").read_text())
    entry["key"] = _key(k=8).digest()
    (tmp_path / key.digest() / "ledger" / "p1.json").write_text(json.dumps(entry))
    with pytest.raises(CacheError, match="another cache"):
        read_entry(folder, "p1", key)


def test_corrupt_part_is_named_and_kept(tmp_path):
    key, folder = _commit_two_parts(tmp_path)
    shard = tmp_path / key.digest() / "parts" / "p1.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"part f:3-6 is corrupt.*run `raykd cache repair .*` \(it moves the damaged part aside"):
        read_entry(folder, "p1", key)
    assert shard.exists() and (tmp_path / key.digest() / "ledger" / "p1.json").exists()


def test_open_cache_names_the_mismatching_field(tmp_path):
    key, folder = _commit_two_parts(tmp_path)
    finalize(folder, key, ["p0", "p1", "p2"], {}, 0.0)
    with pytest.raises(CacheError, match="k: cache has 4, run wants 8"):
        open_cache(folder, expect=_key(k=8))


def test_open_cache_refuses_another_schema_version_and_says_relabel(tmp_path):
    key, folder = _commit_two_parts(tmp_path)
    finalize(folder, key, ["p0", "p1", "p2"], {}, 0.0)
    manifest = tmp_path / key.digest() / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["schema_version"] = SCHEMA_VERSION - 1  # an older raykd's cache
    manifest.write_text(json.dumps(raw))
    with pytest.raises(CacheError, match=f"schema version {SCHEMA_VERSION - 1}.*relabel"):
        open_cache(folder)


def test_missing_manifest_is_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="not a finished soft-label cache"):
        open_cache(tmp_path)


def test_temporary_shards_of_an_interrupted_run_are_removed(tmp_path):
    key, folder = _commit_two_parts(tmp_path)
    stale = tmp_path / key.digest() / "parts" / "p3.parquet.1a2b3c4d.tmp"
    stale.write_bytes(b"half a shard")
    assert remove_partials(folder) == 1 and not stale.exists()
    assert done_parts(folder) == {"p0", "p1", "p2"}
    assert ledger_file(folder, "p0").endswith("ledger/p0.json")


def test_partial_folders_of_the_old_layout_are_removed_and_reported(tmp_path, capsys):
    from raykd.soft_labels.plan import _remove_old_partial_folders

    (tmp_path / "abc.partial-1234abcd" / "x").mkdir(parents=True)
    (tmp_path / "finished").mkdir()
    _remove_old_partial_folders(str(tmp_path))
    assert not (tmp_path / "abc.partial-1234abcd").exists() and (tmp_path / "finished").exists()
    assert "removed 1 unfinished cache folder" in capsys.readouterr().out


def test_cache_verify_and_repair_move_only_the_damaged_part_aside(tmp_path, capsys):
    from raykd.cli import cli

    key, folder = _commit_two_parts(tmp_path)
    finalize(folder, key, ["p0", "p1", "p2"], {}, 0.0)
    assert cli(["cache", "verify", str(tmp_path)]) == 0  # a labels.cache_dir root: each cache under it
    assert capsys.readouterr().out == f"{folder}: 3 committed part(s), finished\n"
    shard = tmp_path / key.digest() / "parts" / "p1.parquet"
    damaged = shard.read_bytes()[:-10]
    shard.write_bytes(damaged)
    (tmp_path / key.digest() / "parts" / "p7.parquet.1a2b.tmp").write_bytes(b"half")
    with pytest.raises(CacheError, match=r"shard .*p1\.parquet is .* bytes, .*manifest\.json says .*run `raykd cache repair"):
        open_cache(folder, expect=key)

    assert cli(["cache", "verify", folder]) == 2
    out, err = capsys.readouterr()
    assert "part f:3-6 is corrupt" in out and "stray file" in out and "manifest.json describes a cache with 1 damaged" in out
    assert err == (f"error: 1 damaged part(s) in 1 of 1 cache(s): run `raykd cache repair {folder}` (it moves them aside, "
                   "deleting nothing), then the labeling command again\n")
    assert cli(["cache", "repair", folder]) == 0
    out = capsys.readouterr().out
    assert out.count("  moved ") == 4 and "relabels only the parts moved aside" in out
    assert done_parts(folder) == {"p0", "p2"} and not (tmp_path / key.digest() / "manifest.json").exists()
    aside = next((tmp_path / key.digest() / "damaged").iterdir())  # nothing deleted: all of it is here
    assert (aside / "parts" / "p1.parquet").read_bytes() == damaged and (aside / "ledger" / "p1.json").exists()
    assert (aside / "manifest.json").exists() and (aside / "parts" / "p7.parquet.1a2b.tmp").read_bytes() == b"half"
    assert cli(["cache", "verify", folder]) == 0 and "2 committed part(s), unfinished" in capsys.readouterr().out
    read_entry(folder, "p0", key)  # the good parts are untouched and still pass
    write_part(folder, key, "p1", _table(key, 1, real=5), part_id="f:3-6", doc_ids=["d1-0", "d1-1", "d1-2"])
    assert finalize(folder, key, ["p0", "p1", "p2"], {}, 0.0).rows == 2 * B  # relabeling p1 finishes the cache


def test_cache_verify_of_a_folder_without_a_cache_is_a_user_error(tmp_path, capsys):
    from raykd.cli import cli

    assert cli(["cache", "verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} holds no soft-label cache")
