"""The Ray Data view of the soft-label cache that a student trains on: shards read by small
tasks, decoded into numpy rows, in the cache's order or a seeded shuffle of its shards.

Kept free of torch: Ray pickles these map functions by reference, so every process that runs or
plans them (the read tasks, Ray Train's dataset manager and split coordinator) imports this
module, and importing torch there costs each of them seconds for nothing.
"""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.parquet as pq

from raykd import storage
from raykd.soft_labels.join import decode_joined, teacher_column
from raykd.soft_labels.schema import decode_batch, form_of, label_columns

DATA_CPUS = 0.25
"""CPUs of each Ray Data task that reads and decodes the soft-label cache for training."""


def soft_label_dataset(shard_files: list[str], shuffle: bool, seed: int, num_teachers: int = 1):
    """Ray Dataset of decoded soft-label rows (numpy ``[T]`` / ``[T, K]`` tensors per row).

    With ``num_teachers > 1`` the shards are joined caches (:mod:`raykd.soft_labels.join`) and
    each teacher's label columns are decoded too. Shards may be local paths or URIs of one
    filesystem (``s3://``, ``gs://``): the filesystem object is resolved once here and travels to
    the read tasks with its endpoint and credentials (:mod:`raykd.storage`).
    """
    import ray

    fs, first = storage.resolve(shard_files[0], setting="labels.cache_dir")
    form = form_of(pq.read_schema(first, filesystem=fs).names)  # top-k or sampled labels: their own columns
    columns = ["input_ids", "attention_mask", "loss_mask"] + [
        teacher_column(i, name) for i in range(num_teachers) for name in label_columns(form)]
    paths = [storage.resolve(f)[1] for f in shard_files]
    # One block per shard, read by a task of DATA_CPUS. Not `ray.data.read_parquet`: from Ray 2.60 it
    # first runs a `ListFiles` task that always reserves 1 CPU whatever `num_cpus` says, and on a
    # 2-CPU node whose teacher serves during training (on-policy, live fill) beside a 1-CPU worker
    # that task never schedules and step 0 waits forever. The shards are known from the manifest,
    # so nothing needs listing.
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)).map_batches(
        functools.partial(read_shards, columns=columns, filesystem=fs), batch_size=None,
        batch_format="pyarrow", num_cpus=DATA_CPUS)
    if shuffle:
        ds = ds.randomize_block_order(seed=seed)
    return decoded(ds, num_teachers)


def read_shards(batch: pa.Table, columns: list[str], filesystem) -> pa.Table:
    """The rows of the shards named in ``batch["path"]``, in order (a Ray Data map function)."""
    return pa.concat_tables([pq.read_table(p, columns=columns, filesystem=filesystem)
                             for p in batch.column("path").to_pylist()])


def decoded(rows, num_teachers: int = 1):
    """A Ray Dataset of undecoded cache rows (e.g. a cache filled live,
    :mod:`raykd.soft_labels.live`) -> decoded rows, as :func:`soft_label_dataset` gives them."""
    decode = decode_batch if num_teachers == 1 else functools.partial(decode_joined, num_teachers=num_teachers)
    return rows.map_batches(decode, batch_format="pyarrow", num_cpus=DATA_CPUS)


def in_order(ds):
    """``ds`` set to yield its rows in the dataset's order (Ray Data's ``preserve_order``) in
    Ray Train's local mode; :func:`train_student` asks the same of the workers' shards. The
    training order is then the cache's (or its seeded shuffle): a rerun, or a run whose cache
    is filled live, sees the rows in the same order."""
    ds.context.execution_options.preserve_order = True
    return ds
