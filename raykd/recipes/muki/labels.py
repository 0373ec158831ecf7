"""The teachers' class labels for MUKI, asked of served classifier teachers and cached.

Per teacher and split, keyed like every class-label cache (teacher weights and tokenizer
fingerprints, the data, ``T``; :func:`raykd.soft_labels.class_labels.class_cache_key`) and
committed by the one cache commit (:func:`~raykd.soft_labels.cache.write_part` and
:func:`~raykd.soft_labels.cache.finalize`):

* ``logits`` (every split): the deterministic pass's raw logits ``[N, C_i]``, the plain
  class-label cache (the same folder any classifier-teacher recipe would write);
* ``mc`` (train): ``log`` of the mean of M Monte-Carlo dropout passes' probabilities, in the
  class-label schema; the key's ``logprobs_mode`` names M, the dropout scope and seed;
* ``features`` (train, for DFA): pooled features ``[N, H]``, its own small schema (a separate
  cache kind, ``kind=class_features``), key ``logprobs_mode=pooled_features``.

Every cache found is read, not recomputed: a rerun starts no teacher and asks nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.cluster import connect
from raykd.config import TeacherConfig, default_cache_root
from raykd.models import load_tokenizer, tokenizer_fingerprint, weights_fingerprint
from raykd.recipes.muki.config import MCConfig, MukiConfig
from raykd.recipes.muki.prepare import _teacher_labels
from raykd.soft_labels.cache import (
    CacheKey,
    cache_dir_for,
    finalize,
    open_cache,
    shard_paths,
    write_part,
)
from raykd.soft_labels.class_labels import (
    class_cache_key,
    class_label_schema,
    encode_rows,
    find_class_cache,
    label_rows,
    read_class_cache,
)
from raykd.soft_labels.schema import META_PREFIX

log = logging.getLogger(__name__)


def teacher_config(cfg: MukiConfig, name: str, path: str) -> TeacherConfig:
    """The Serve config of one classifier teacher."""
    t = cfg.teacher
    return TeacherConfig(name=name, model=str(path), engine="classifier", num_threads=t.num_threads, num_cpus=t.num_cpus,
                         keep_alive=t.keep_alive, max_batch_size=max(cfg.labels.batch_size, 1))


def mc_mode(mc: MCConfig) -> str:
    """The cache key's ``logprobs_mode`` of MC-dropout labels."""
    return f"mc_dropout_mean:passes={mc.passes}:scope={mc.scope}:seed={mc.seed}"


FEATURES_MODE = "pooled_features"


def feature_schema(seq_len: int, width: int, key: CacheKey) -> pa.Schema:
    """Arrow schema of a pooled-feature cache (one row per article, ``H = width`` floats)."""
    return pa.schema(
        [
            pa.field("doc_id", pa.string()),
            pa.field("attention_mask", pa.list_(pa.uint8(), seq_len)),
            pa.field("label", pa.int32()),
            pa.field("teacher_features", pa.list_(pa.float32(), width)),
        ],
        metadata={META_PREFIX + b"cache_key": key.digest().encode(), META_PREFIX + b"kind": b"class_features"},
    )


def _fixed(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=arrow_type), values.shape[1])


def _commit(root: Path, key: CacheKey, table: pa.Table, teacher: dict[str, Any], seconds: float):
    """One part with every row, committed and indexed by the one cache commit."""
    folder = cache_dir_for(root, key)
    write_part(folder, key, "all", table, part_id="all", doc_ids=table.column("doc_id").to_pylist(), seconds=seconds)
    return finalize(folder, key, ["all"], teacher, seconds)


def read_features(folder: Path, key: CacheKey) -> np.ndarray:
    """``[N, H]`` float32 features of a finished feature cache (checked against ``key``)."""
    manifest = open_cache(folder, key)
    table = pa.concat_tables([pq.read_table(f) for f in shard_paths(folder, manifest)])
    col = table.column("teacher_features").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, -1).astype(np.float32)


@dataclasses.dataclass
class TeacherLabels:
    """One teacher's labels: ``logits`` per split ``[N, C_i]``; on train ``mean_probs`` ``[N, C_i]``
    (MC dropout) and ``features`` ``[N, H]`` when asked for."""

    logits: dict[str, np.ndarray]
    mean_probs: np.ndarray | None = None
    features: np.ndarray | None = None


def _ask(handle, rows: dict[str, np.ndarray], batch_size: int, **kwargs: Any) -> dict[str, np.ndarray]:
    """``score_mc`` over all rows, two calls in flight; outputs concatenated in row order."""
    n = len(rows["label"])
    pending: deque = deque()
    parts: list[dict[str, np.ndarray]] = []
    seed = kwargs.pop("seed", 0)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        pending.append(handle.score_mc.remote(rows["input_ids"][sl], rows["attention_mask"][sl], seed=seed + s, **kwargs))
        while len(pending) >= 2 or (pending and s + batch_size >= n):
            parts.append(pending.popleft().result())
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def teacher_labels(cfg: MukiConfig, name: str, path: str, rows: dict[str, dict[str, np.ndarray]], data_fps: dict[str, str],
                   *, need_mc: bool, need_features: bool, stats: dict[str, Any]) -> TeacherLabels:
    """Find (or make through the served teacher) one teacher's caches.

    Args:
        name: the teacher's Serve application name; path: its model folder.
        rows: tokenised rows per split (``doc_id``, ``input_ids``, ``attention_mask``, ``label``).
        data_fps: ``documents_fingerprint`` of each split's articles.
        need_mc, need_features: also the train split's MC-dropout and feature caches.
        stats: updated with ``teacher_calls``, ``label_s``, ``cache_hits``, ``cache_misses``,
            ``mc_passes`` (stochastic passes x articles, of the head or the whole encoder),
            ``encoder_passes`` (full encoder forwards on train) and, per teacher, ``mc_s`` (seconds
            of its train labeling) and, for a head-only run with ``mc.cost_sample``,
            ``encoder_mc_cost`` (the paper's full-encoder MC timed on a sample).
    """
    root = (Path(cfg.labels.cache_dir).expanduser().resolve() if cfg.labels.cache_dir else _default_root()) / "class_labels"
    n_cls = len(_teacher_labels(path))
    w_fp, t_fp = weights_fingerprint(path), tokenizer_fingerprint(load_tokenizer(path))
    keys = {s: class_cache_key(w_fp, t_fp, "float32", n_cls, data_fps[s], cfg.data.seq_len) for s in rows}
    mc_key = dataclasses.replace(keys["train"], logprobs_mode=mc_mode(cfg.mc))
    feat_key = dataclasses.replace(keys["train"], logprobs_mode=FEATURES_MODE)
    found = {s: find_class_cache(root, k) for s, k in keys.items()}
    mc_found = find_class_cache(root, mc_key) if need_mc else None
    feat_dir = Path(cache_dir_for(root, feat_key))
    feat_done = (feat_dir / "manifest.json").is_file() if need_features else True
    out = TeacherLabels({})
    handle = None
    info = {"path": str(path), "weights_fingerprint": w_fp}

    def get_handle():
        nonlocal handle
        if handle is None:
            connect(cfg.ray)  # Ray starts only when a teacher must be asked
            # lazy: keeps ray out of import time
            from raykd.teacher.deployment import start_teacher

            handle, _ = start_teacher(teacher_config(cfg, name, path), str(path))
        return handle

    train_missing = found["train"][1] is None or (need_mc and mc_found[1] is None) or not feat_done
    if train_missing:
        t0 = time.time()
        passes = cfg.mc.passes if need_mc and mc_found[1] is None else 0
        got = _ask(get_handle(), rows["train"], cfg.labels.batch_size, passes=passes, scope=cfg.mc.scope, seed=cfg.mc.seed)
        seconds = time.time() - t0
        n = len(rows["train"]["label"])
        stats["teacher_calls"] += -(-n // cfg.labels.batch_size)
        stats["label_s"] += seconds
        stats["mc_passes"] += passes * n
        stats["encoder_passes"] = stats.get("encoder_passes", 0) + n * (1 + (passes if cfg.mc.scope == "encoder" else 0))
        stats.setdefault("mc_s", {})[name] = round(seconds, 1)
        seq_len = rows["train"]["input_ids"].shape[1]
        if found["train"][1] is None:
            _commit(root, keys["train"], encode_rows(rows["train"], got["logits"], class_label_schema(seq_len, n_cls, keys["train"])), info, seconds)
        if passes:
            log_mean = np.log(np.clip(got["mean_probs"], 1e-30, None)).astype(np.float32)
            _commit(root, mc_key, encode_rows(rows["train"], log_mean, class_label_schema(seq_len, n_cls, mc_key)),
                    {**info, "mc_passes": passes, "mc_scope": cfg.mc.scope, "encoder_passes": passes * n if cfg.mc.scope == "encoder" else n}, seconds)
        if not feat_done:
            f = got["features"].astype(np.float32)
            table = pa.Table.from_arrays(
                [pa.array(np.asarray(rows["train"]["doc_id"]).astype(str)), _fixed(rows["train"]["attention_mask"].astype(np.uint8), pa.uint8()),
                 pa.array(rows["train"]["label"].astype(np.int32)), _fixed(f, pa.float32())],
                schema=feature_schema(seq_len, f.shape[1], feat_key))
            _commit(root, feat_key, table, info, seconds)
        stats["cache_misses"] += 1
        found["train"] = find_class_cache(root, keys["train"])
        mc_found = find_class_cache(root, mc_key) if need_mc else None
    else:
        stats["cache_hits"] += 1
    for split, split_rows in rows.items():
        if found[split][1] is None:
            t0 = time.time()
            label_rows(get_handle(), split_rows, root, keys[split], num_classes=n_cls, batch_size=cfg.labels.batch_size, teacher=info)
            stats["teacher_calls"] += -(-len(split_rows["label"]) // cfg.labels.batch_size)
            stats["label_s"] += time.time() - t0
            stats["cache_misses"] += 1
            found[split] = find_class_cache(root, keys[split])
        out.logits[split] = read_class_cache(*found[split])["teacher_logits"]
    if need_mc:
        out.mean_probs = np.exp(read_class_cache(*mc_found)["teacher_logits"])
    if need_features:
        out.features = read_features(feat_dir, feat_key)
    if handle is not None:
        if cfg.mc.cost_sample and need_mc:
            stats.setdefault("encoder_mc_cost", {})[name] = measure_encoder_mc(handle, rows["train"], cfg)
        if not cfg.teacher.keep_alive:
            # lazy: keeps ray out of import time
            from raykd.teacher.deployment import stop_teacher

            stop_teacher(name)
    return out


def measure_encoder_mc(handle, rows: dict[str, np.ndarray], cfg: MukiConfig) -> dict[str, float]:
    """Time the paper's full-encoder MC dropout on ``cfg.mc.cost_sample`` train articles against
    one deterministic pass of them (its cost; what a head-only run saves)."""
    n = min(cfg.mc.cost_sample, len(rows["label"]))
    sample = {k: v[:n] for k, v in rows.items()}
    t0 = time.time()
    _ask(handle, sample, cfg.labels.batch_size, passes=0, scope="encoder")
    det = time.time() - t0
    t0 = time.time()
    _ask(handle, sample, cfg.labels.batch_size, passes=cfg.mc.passes, scope="encoder")
    full = time.time() - t0
    return {"articles": n, "deterministic_s": round(det, 2), "encoder_mc_s": round(full, 2),
            "s_per_article_pass": round(max(full - det, 0.0) / (n * cfg.mc.passes), 4)}


def _default_root() -> Path:
    return default_cache_root() / "soft_labels"
