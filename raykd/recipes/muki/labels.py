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


@dataclasses.dataclass
class _TeacherCaches:
    """Where one teacher's caches live (``root``, one key per kind) and which of them are finished.

    ``found`` per split and ``mc_found`` are :func:`~raykd.soft_labels.class_labels.find_class_cache`'s
    ``(folder, manifest or None)``; ``mc_found`` is None when MC labels are not asked for, and
    ``feat_done`` is True when features are not.
    """

    root: Path
    n_cls: int
    info: dict[str, Any]
    keys: dict[str, CacheKey]
    mc_key: CacheKey
    feat_key: CacheKey
    found: dict[str, tuple]
    mc_found: tuple | None
    feat_dir: Path
    feat_done: bool

    def train_missing(self, need_mc: bool) -> bool:
        """Whether a train cache asked for is not finished (one pass over train then makes them all)."""
        return self.found["train"][1] is None or (need_mc and self.mc_found[1] is None) or not self.feat_done


def _find_caches(cfg: MukiConfig, path: str, rows: dict[str, dict[str, np.ndarray]], data_fps: dict[str, str], *,
                 need_mc: bool, need_features: bool) -> _TeacherCaches:
    """The keys of one teacher's caches (its weights and tokenizer fingerprints, each split's
    data fingerprint, ``seq_len``) and which are finished under the labels' cache root."""
    root = (Path(cfg.labels.cache_dir).expanduser().resolve() if cfg.labels.cache_dir else _default_root()) / "class_labels"
    n_cls = len(_teacher_labels(path))
    w_fp, t_fp = weights_fingerprint(path), tokenizer_fingerprint(load_tokenizer(path))
    keys = {s: class_cache_key(w_fp, t_fp, "float32", n_cls, data_fps[s], cfg.data.seq_len) for s in rows}
    mc_key = dataclasses.replace(keys["train"], logprobs_mode=mc_mode(cfg.mc))
    feat_key = dataclasses.replace(keys["train"], logprobs_mode=FEATURES_MODE)
    feat_dir = Path(cache_dir_for(root, feat_key))
    return _TeacherCaches(
        root, n_cls, {"path": str(path), "weights_fingerprint": w_fp}, keys, mc_key, feat_key,
        found={s: find_class_cache(root, k) for s, k in keys.items()},
        mc_found=find_class_cache(root, mc_key) if need_mc else None,
        feat_dir=feat_dir, feat_done=(feat_dir / "manifest.json").is_file() if need_features else True)


class _ServedTeacher:
    """One teacher's Serve application, started on first use: Ray starts only when a teacher must be asked."""

    def __init__(self, cfg: MukiConfig, name: str, path: str) -> None:
        self.cfg, self.name, self.path = cfg, name, path
        self._handle = None

    @property
    def started(self) -> bool:
        return self._handle is not None

    @property
    def handle(self):
        """The deployment handle (the teacher is deployed on the first call)."""
        if self._handle is None:
            connect(self.cfg.ray)
            # lazy: keeps ray out of import time
            from raykd.teacher.apps import start_teacher

            self._handle, _ = start_teacher(teacher_config(self.cfg, self.name, self.path), str(self.path))
        return self._handle

    def release(self) -> None:
        """Stop the application unless ``teacher.keep_alive``."""
        if not self.cfg.teacher.keep_alive:
            # lazy: keeps ray out of import time
            from raykd.teacher.apps import stop_teacher

            stop_teacher(self.name)


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
    caches = _find_caches(cfg, path, rows, data_fps, need_mc=need_mc, need_features=need_features)
    teacher = _ServedTeacher(cfg, name, path)
    if caches.train_missing(need_mc):
        _label_train(caches, teacher, rows["train"], cfg, need_mc, stats)
    else:
        stats["cache_hits"] += 1
    out = TeacherLabels({})
    for split, split_rows in rows.items():
        if caches.found[split][1] is None:
            _label_split(caches, split, split_rows, teacher, cfg, stats)
        out.logits[split] = read_class_cache(*caches.found[split])["teacher_logits"]
    if need_mc:
        out.mean_probs = np.exp(read_class_cache(*caches.mc_found)["teacher_logits"])
    if need_features:
        out.features = read_features(caches.feat_dir, caches.feat_key)
    if teacher.started:
        if cfg.mc.cost_sample and need_mc:
            stats.setdefault("encoder_mc_cost", {})[name] = measure_encoder_mc(teacher.handle, rows["train"], cfg)
        teacher.release()
    return out


def _label_train(caches: _TeacherCaches, teacher: _ServedTeacher, rows: dict[str, np.ndarray], cfg: MukiConfig,
                 need_mc: bool, stats: dict[str, Any]) -> None:
    """Ask the teacher once over the train rows for every missing train cache (logits, the MC
    mean of ``mc.passes`` passes, pooled features), commit them, and count the work in ``stats``
    (as :func:`teacher_labels`); ``caches.found["train"]`` and ``caches.mc_found`` are refreshed."""
    t0 = time.time()
    passes = cfg.mc.passes if need_mc and caches.mc_found[1] is None else 0
    got = _ask(teacher.handle, rows, cfg.labels.batch_size, passes=passes, scope=cfg.mc.scope, seed=cfg.mc.seed)
    seconds = time.time() - t0
    n = len(rows["label"])
    stats["teacher_calls"] += -(-n // cfg.labels.batch_size)
    stats["label_s"] += seconds
    stats["mc_passes"] += passes * n
    stats["encoder_passes"] = stats.get("encoder_passes", 0) + n * (1 + (passes if cfg.mc.scope == "encoder" else 0))
    stats.setdefault("mc_s", {})[teacher.name] = round(seconds, 1)
    _commit_train(caches, rows, got, passes, cfg.mc.scope, seconds)
    stats["cache_misses"] += 1
    caches.found["train"] = find_class_cache(caches.root, caches.keys["train"])
    caches.mc_found = find_class_cache(caches.root, caches.mc_key) if need_mc else None


def _commit_train(caches: _TeacherCaches, rows: dict[str, np.ndarray], got: dict[str, np.ndarray], passes: int,
                  scope: str, seconds: float) -> None:
    """Commit what one pass over the train rows gave (``got``: ``logits`` ``[N, C]``, with
    ``passes`` the ``mean_probs`` ``[N, C]`` and ``features`` ``[N, H]``) into the caches still missing."""
    seq_len, n = rows["input_ids"].shape[1], len(rows["label"])
    keys, info = caches.keys, caches.info
    if caches.found["train"][1] is None:
        table = encode_rows(rows, got["logits"], class_label_schema(seq_len, caches.n_cls, keys["train"]))
        _commit(caches.root, keys["train"], table, info, seconds)
    if passes:
        log_mean = np.log(np.clip(got["mean_probs"], 1e-30, None)).astype(np.float32)
        _commit(caches.root, caches.mc_key, encode_rows(rows, log_mean, class_label_schema(seq_len, caches.n_cls, caches.mc_key)),
                {**info, "mc_passes": passes, "mc_scope": scope, "encoder_passes": passes * n if scope == "encoder" else n}, seconds)
    if not caches.feat_done:
        f = got["features"].astype(np.float32)
        table = pa.Table.from_arrays(
            [pa.array(np.asarray(rows["doc_id"]).astype(str)), _fixed(rows["attention_mask"].astype(np.uint8), pa.uint8()),
             pa.array(rows["label"].astype(np.int32)), _fixed(f, pa.float32())],
            schema=feature_schema(seq_len, f.shape[1], caches.feat_key))
        _commit(caches.root, caches.feat_key, table, info, seconds)


def _label_split(caches: _TeacherCaches, split: str, rows: dict[str, np.ndarray], teacher: _ServedTeacher,
                 cfg: MukiConfig, stats: dict[str, Any]) -> None:
    """Label one split's missing logits cache through the teacher (:func:`~raykd.soft_labels.class_labels.label_rows`),
    count it in ``stats`` and refresh ``caches.found[split]``."""
    t0 = time.time()
    label_rows(teacher.handle, rows, caches.root, caches.keys[split], num_classes=caches.n_cls,
               batch_size=cfg.labels.batch_size, teacher=caches.info)
    stats["teacher_calls"] += -(-len(rows["label"]) // cfg.labels.batch_size)
    stats["label_s"] += time.time() - t0
    stats["cache_misses"] += 1
    caches.found[split] = find_class_cache(caches.root, caches.keys[split])


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
