"""The teacher-feature cache: a cache kind of its own next to the soft labels, for the feature
(intermediate-layer) terms that read the teacher's features from disk instead of running the
teacher in every Train worker.

One feature part per soft-label part, its rows in the same order as that part's shard, committed
by the same code as every cache (:func:`raykd.soft_labels.cache.write_part` then
:func:`~raykd.soft_labels.cache.finalize`: shard, ledger entry, manifest). The key
(:class:`FeatureKey`) is the teacher's fingerprints, the layout (which blocks, which tensors, the
stored dtype) and the identity of the rows: the digest of the soft-label cache whose blocks were
read, so features always describe exactly those blocks.

Only what a method reads is kept (the compact form, :func:`raykd.train.features.compact`), and
only each row's ``n`` real tokens, as float16 bytes:

===================  =======================================================================
column               meaning
===================  =======================================================================
doc_id, block_index  the soft-label row's identity (checked when the two are read together)
attention_mask       ``list<uint8>`` of ``n`` ones (the real tokens; counted by the ledger)
embeddings           ``n * H`` float16 (the input of block 0), if kept
hidden.<j>           ``n * H`` float16: the output of teacher block ``j``
query.<j>            ``n * heads * d`` float16 (token-major) queries of block ``j`` as the attention used them
key.<j>, value.<j>   ``n * kv_heads * d`` float16 keys and values of block ``j``
===================  =======================================================================

Schema metadata ``raykd.feature_shapes`` holds ``H``, ``heads``, ``kv_heads``, ``d``, the
attention scaling, the teacher's block count and ``T``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raykd import storage
from raykd.losses import get_loss
from raykd.losses.features import FeatureLayout, features_from_batch  # noqa: F401  (the cache's layout)
from raykd.soft_labels.cache import (
    MANIFEST,
    SCHEMA_VERSION,
    cache_dir_for,
    done_parts,
    finalize,
    open_cache,
    write_part,
)
from raykd.soft_labels.schema import decode_batch

FEATURE_FORMAT = 1
"""Version of the feature shard layout (part of the key)."""
SHAPES_META = b"raykd.feature_shapes"


def feature_source(terms: Sequence[str], setting: str) -> str:
    """``online`` or ``cached`` for a student's feature ``terms`` under ``train.feature_teacher``
    (``auto``: cached only when every term measured faster cached, ``LossSpec.measured_faster``)."""
    if setting != "auto":
        return setting
    return "cached" if terms and all(get_loss(t).measured_faster == "cached" for t in terms) else "online"


def feature_layout(terms: dict[str, dict[str, Any]], layer_map) -> FeatureLayout:
    """The teacher tensors the feature ``terms`` (``{name: hyper-params}``) read on ``layer_map``.

    Raises:
        ValueError: a term whose reads are not known here (it must run with the teacher online).
    """
    mapped = tuple(t for _, t in layer_map.pairs)
    hidden, attention, embeddings = set(), set(), False
    for name, params in terms.items():
        if name == "distilbert_cos":
            hidden.add(layer_map.last[1])
        elif name in ("pkd", "rail_kd", "lrc_bert"):
            hidden.update(mapped)
        elif name == "tinybert":
            hidden.update(mapped)
            attention.update(mapped)
            embeddings = embeddings or bool(params.get("embeddings", True))
        elif name == "minilmv2":
            layer = params.get("teacher_layer")
            attention.add(layer_map.last[1] if layer is None else int(layer))
        elif name == "minilm":
            attention.add(layer_map.last[1])
        else:
            raise ValueError(f"feature term {name!r} has no cached form (it reads every teacher layer or more); "
                             "train with train.feature_teacher=online")
    return FeatureLayout(tuple(sorted(hidden)), tuple(sorted(attention)), embeddings)


@dataclass(frozen=True)
class FeatureKey:
    """Everything that changes a feature cache's content."""

    teacher_fingerprint: str
    tokenizer_fingerprint: str
    layout: dict[str, Any]
    rows: str
    """The digest of the soft-label cache whose blocks the features describe (data identity)."""
    dtype: str = "float16"
    feature_format: int = FEATURE_FORMAT
    schema_version: int = SCHEMA_VERSION
    kind: str = field(default="teacher_features")

    def digest(self) -> str:
        import hashlib

        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def teacher_shapes(model, seq_len: int) -> dict[str, Any]:
    """The shapes a feature shard records (``raykd.feature_shapes``) for ``model`` at block length ``seq_len``."""
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"hidden": c.hidden_size, "heads": c.num_attention_heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads, "head_dim": d,
            "scaling": d ** -0.5, "layers": c.num_hidden_layers, "seq_len": seq_len}


def encode_features(features, layout: FeatureLayout, doc_ids, block_index, lengths: np.ndarray,
                    shapes: dict[str, Any]) -> pa.Table:
    """A batch's teacher :class:`~raykd.losses.features.Features` as feature-cache rows (each
    row's ``lengths[i]`` real tokens; right-padded blocks)."""
    def rows(x, token_major: bool) -> pa.Array:  # [B, T, ...] or [B, h, T, d] -> one binary per row
        x = x.detach().to("cpu").float().half()
        if token_major:
            x = x.transpose(1, 2)
        a = x.numpy()
        return pa.array([a[i, : lengths[i]].tobytes() for i in range(len(lengths))], type=pa.binary())

    cols: dict[str, pa.Array] = {
        "doc_id": pa.array([str(d) for d in doc_ids], pa.string()),
        "block_index": pa.array(np.asarray(block_index, dtype=np.int32)),
        "attention_mask": pa.array([np.ones(n, np.uint8) for n in lengths], pa.list_(pa.uint8())),
    }
    if layout.embeddings:
        cols["embeddings"] = rows(features.embeddings, False)
    for j in layout.hidden:
        cols[f"hidden.{j}"] = rows(features.hidden[j], False)
    for j in layout.attention:
        for name, xs in (("query", features.queries), ("key", features.keys), ("value", features.values)):
            cols[f"{name}.{j}"] = rows(xs[j], True)
    table = pa.table(cols)
    return table.replace_schema_metadata({SHAPES_META: json.dumps(shapes).encode()})


def decode_features(table: pa.Table) -> dict[str, np.ndarray]:
    """Feature-cache rows -> ``{column: float16 [B, T, ...]}`` (zeros at padding) and
    ``token_mask`` ``[B, T]``; attention tensors as ``[B, h, T, d]``."""
    shapes = json.loads(table.schema.metadata[SHAPES_META])
    t = shapes["seq_len"]
    lengths = np.array([len(x) for x in table.column("attention_mask").to_pylist()])
    out: dict[str, np.ndarray] = {"token_mask": np.arange(t)[None, :] < lengths[:, None]}
    for name in table.column_names:
        if name in ("doc_id", "block_index", "attention_mask"):
            continue
        kind = name.split(".")[0]
        inner = (shapes["hidden"],) if kind in ("embeddings", "hidden") else \
            (shapes["heads" if kind == "query" else "kv_heads"], shapes["head_dim"])
        arr = np.zeros((len(lengths), t, *inner), np.float16)
        for i, buf in enumerate(table.column(name).to_pylist()):
            arr[i, : lengths[i]] = np.frombuffer(buf, np.float16).reshape(lengths[i], *inner)
        out[name] = arr.transpose(0, 2, 1, 3) if kind in ("query", "key", "value") else arr
    return out


def label_features(label_dir: str, label_manifest, cache_root: str, key: FeatureKey, teacher_path: str,
                   layout: FeatureLayout, load_teacher: Callable[..., Any], *, batch_size: int = 8,
                   threads: int | None = None) -> tuple[str, Any, dict]:
    """Fill (or resume) the feature cache of ``key``: the teacher runs once over the rows of the
    soft-label cache ``label_dir``, part by part, each part committed through ``write_part``.

    Runs where it is called (a Ray task in :func:`ensure_teacher_features`). A cache whose
    manifest exists is opened and returned: the teacher is asked nothing.

    Args:
        load_teacher: ``load_teacher(teacher_path, attention=...)`` -> the feature teacher, with
            ``.model`` and ``.forward(inputs) -> (_, Features)`` (e.g.
            :meth:`raykd.train.features.FeatureTeacher.load`); called once, on the first missing part.

    Returns:
        ``(cache folder, manifest, {"hit", "teacher_calls", "seconds"})``.
    """
    import pyarrow.parquet as pq
    import torch

    folder = cache_dir_for(cache_root, key)
    if storage.is_file(storage.join(folder, MANIFEST)):
        return folder, open_cache(folder, None), {"hit": True, "teacher_calls": 0, "seconds": 0.0}
    if threads:
        torch.set_num_threads(threads)
    start, calls = time.perf_counter(), 0
    teacher = None
    done = done_parts(folder)
    parts = []
    for shard in label_manifest.shards:
        part = shard["file"].rsplit("/", 1)[-1].removesuffix(".parquet")
        parts.append(part)
        if part in done:
            continue
        if teacher is None:
            teacher = load_teacher(teacher_path, attention=bool(layout.attention))
            shapes = teacher_shapes(teacher.model, label_manifest.key_fields["seq_len"])
        with storage.open_input(storage.join(label_dir, shard["file"])) as f:
            table = pq.read_table(f)
        rows = decode_batch(table)
        t_part, tables = time.perf_counter(), []
        for s in range(0, table.num_rows, batch_size):
            ids = torch.as_tensor(rows["input_ids"][s: s + batch_size]).long()
            am = torch.as_tensor(rows["attention_mask"][s: s + batch_size]).long()
            _, feats = teacher.forward({"input_ids": ids, "attention_mask": am})
            calls += 1
            tables.append(encode_features(feats, layout, table.column("doc_id").to_pylist()[s: s + batch_size],
                                          table.column("block_index").to_pylist()[s: s + batch_size],
                                          am.sum(1).numpy(), shapes))
        write_part(folder, key, part, pa.concat_tables(tables), part_id=shard["part"],
                   doc_ids=sorted(set(table.column("doc_id").to_pylist())), teacher_calls=len(tables),
                   seconds=time.perf_counter() - t_part)
    manifest = finalize(folder, key, parts, {"path": str(teacher_path), "layout": asdict(layout)},
                        time.perf_counter() - start)
    return folder, manifest, {"hit": False, "teacher_calls": calls, "seconds": time.perf_counter() - start}


def paired_shards(label_dir: str, label_manifest, feature_dir: str, feature_manifest) -> list[tuple[str, str]]:
    """``(soft-label shard, feature shard)`` of each part, in the soft-label manifest's order.

    Raises:
        ValueError: a soft-label part has no feature part (the caches do not describe the same rows).
    """
    by_part = {s["file"].rsplit("/", 1)[-1]: s["file"] for s in feature_manifest.shards}
    out = []
    for s in label_manifest.shards:
        name = s["file"].rsplit("/", 1)[-1]
        if name not in by_part:
            raise ValueError(f"the feature cache {feature_dir} has no part for soft-label shard {s['file']}; relabel the features")
        out.append((storage.join(label_dir, s["file"]), storage.join(feature_dir, by_part[name])))
    return out


def read_paired(pair: dict[str, Any]) -> dict[str, np.ndarray]:
    """One part's soft labels and features, decoded and put side by side (features as ``f.*``).

    Raises:
        ValueError: the two shards do not hold the same rows in the same order.
    """
    import pyarrow.parquet as pq

    with storage.open_input(pair["labels"]) as f:
        labels = pq.read_table(f, columns=["doc_id", "block_index", "input_ids", "attention_mask", "loss_mask",
                                           "topk_dict", "topk_index", "topk_sqrtp", "top1_rank", "tail_sqrtp",
                                           "label_logprobs"])
    with storage.open_input(pair["features"]) as f:
        feats = pq.read_table(f)
    same = (labels.column("doc_id").to_pylist() == feats.column("doc_id").to_pylist()
            and labels.column("block_index").to_pylist() == feats.column("block_index").to_pylist())
    if not same:
        raise ValueError(f"feature shard {pair['features']} does not hold the rows of {pair['labels']} in order")
    out = decode_batch(labels)
    out.update({f"f.{k}": v for k, v in decode_features(feats).items()})
    return out


def paired_dataset(pairs: Sequence[tuple[str, str]], shuffle: bool, seed: int):
    """A Ray Dataset of soft-label rows with their cached teacher features (``f.*`` columns)."""
    import ray

    ds = ray.data.from_items([{"labels": a, "features": b} for a, b in pairs])
    if shuffle:
        ds = ds.random_shuffle(seed=seed)

    def read(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = [read_paired({"labels": a, "features": b}) for a, b in zip(batch["labels"], batch["features"])]
        return {k: np.concatenate([d[k] for d in decoded]) for k in decoded[0]}

    return ds.map_batches(read, batch_size=1, num_cpus=0.25)


def ensure_teacher_features(plan, label_dir: str, label_manifest, terms: dict[str, dict[str, Any]], layer_map,
                            load_teacher: Callable[..., Any], *, batch_size: int = 8) -> tuple[list[tuple[str, str]], FeatureLayout, dict[str, Any]]:
    """The feature cache of a student's ``terms`` over the train split's soft-label cache, filled
    by the teacher in one Ray task when its key has no finished cache (a hit asks nothing).
    ``load_teacher`` loads that teacher inside the task (see :func:`label_features`).

    Returns:
        ``(paired shards, layout, stats)``: stats has ``key``, ``path``, ``hit``, ``teacher_calls``,
        ``bytes_per_token`` and ``shapes`` (read back from a shard).
    """
    import ray

    layout = feature_layout(terms, layer_map)
    key = FeatureKey(plan.weights_fp, plan.tokenizer_fp, asdict(layout), rows=label_manifest.key)
    root = _feature_root(plan)
    task = ray.remote(num_cpus=1)(label_features)
    folder, manifest, stats = ray.get(task.remote(label_dir, label_manifest, root, key, str(plan.teacher_path), layout,
                                                  load_teacher, batch_size=batch_size, threads=plan.cfg.teacher.num_threads))
    pairs = paired_shards(label_dir, label_manifest, folder, manifest)
    stats.update(key=key.digest(), path=folder, bytes_per_token=manifest.bytes_per_token, shapes=read_shapes(pairs[0][1]))
    return pairs, layout, stats


def _feature_root(plan) -> str:
    return storage.join(plan.cache_root, "teacher_features")


def read_shapes(shard: str) -> dict[str, Any]:
    """The ``raykd.feature_shapes`` metadata of a feature shard."""
    import pyarrow.parquet as pq

    with storage.open_input(shard) as f:
        return json.loads(pq.read_schema(f).metadata[SHAPES_META])
