"""raykd.storage against a real S3-compatible server (moto on loopback, ``tests/s3_server.py``):
files, atomic parts and listings; a Parquet part written by a Ray task and read by Ray Data; a
Ray Train checkpoint stored in the bucket. The server accepts only its own keys, and the Ray
code drops every ``AWS_*`` variable before touching S3, so a pass shows the endpoint and keys
travel inside the pickled filesystem (the shared ``ray_start`` cluster gets no env vars)."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from raykd import storage

pytestmark = pytest.mark.ray


@pytest.fixture
def prefix(s3_server) -> str:
    """A fresh ``s3://bucket/<random>`` folder for one test."""
    return s3_server.uri(f"t-{uuid.uuid4().hex[:8]}")


def _without_aws_env() -> dict[str, str]:
    """Remove the ``AWS_*`` variables of this process (returned, to put back)."""
    return {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("AWS_")]}


def test_s3_files_json_listing_and_delete(prefix):
    assert storage.list_files(prefix) == [] and not storage.exists(prefix)
    storage.write_bytes(storage.join(prefix, "train", "a.bin"), b"abc")
    storage.write_bytes_atomic(storage.join(prefix, "train", "b.bin"), b"12345")
    storage.write_json(storage.join(prefix, "train", "ledger.json"), {"parts": ["a"]})
    storage.write_json(storage.join(prefix, "train", "ledger.json"), {"parts": ["a", "b"]})  # replaces
    storage.write_bytes(storage.join(prefix, "train", "sub", "c.bin"), b"x")
    train = storage.join(prefix, "train")
    # S3 has no folders: "train" exists because keys start with "train/"
    assert storage.exists(train) and not storage.is_file(train) and storage.exists(prefix)
    assert storage.read_json(storage.join(train, "ledger.json")) == {"parts": ["a", "b"]}
    assert storage.file_size(storage.join(train, "b.bin")) == 5
    assert storage.list_files(train, ".bin") == [storage.join(train, "a.bin"), storage.join(train, "b.bin")]
    assert storage.list_files(train, ".bin", recursive=True)[-1] == storage.join(train, "sub", "c.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(train, "missing.json"))
    storage.delete_dir(train)
    assert not storage.exists(train) and storage.list_files(prefix, recursive=True) == []


def test_s3_atomic_parquet_part_failure_leaves_no_object(prefix):
    table = pa.table({"doc": ["a", "b", "c"], "n": [1, 2, 3]})
    part = storage.join(prefix, "part-00000.parquet")
    with storage.open_output_atomic(part) as stream, pq.ParquetWriter(stream, table.schema) as writer:
        writer.write_table(table)
    with storage.open_input(part) as f:
        assert pq.read_table(f).equals(table)

    broken = storage.join(prefix, "part-00001.parquet")
    with pytest.raises(RuntimeError, match="labeler died"), storage.open_output_atomic(broken) as stream:
        stream.write(b"PAR1 half a part")
        raise RuntimeError("labeler died")
    assert not storage.exists(broken)
    fs, root = storage.resolve(prefix)  # no hidden temporary object left either
    keys = [i.path for i in fs.get_file_info(pa.fs.FileSelector(root, recursive=True))]
    assert keys == [f"{root}/part-00000.parquet"]


def test_ray_task_writes_part_ray_data_reads_it(ray_start, prefix):
    import ray

    fs, folder = storage.resolve(prefix)

    @ray.remote(num_cpus=0.5)
    def write_part(filesystem, path: str, n: int) -> int:
        saved = _without_aws_env()  # only the pickled filesystem knows the endpoint and keys
        try:
            table = pa.table({"id": list(range(n)), "logprob": [-0.5 * i for i in range(n)]})
            with filesystem.open_output_stream(path) as stream, pq.ParquetWriter(stream, table.schema) as writer:
                writer.write_table(table)
            return filesystem.get_file_info(path).size
        finally:
            os.environ.update(saved)

    size = ray.get(write_part.remote(fs, f"{folder}/part-00000.parquet", 50))
    assert size == storage.file_size(storage.join(prefix, "part-00000.parquet")) > 0

    files = storage.list_files(prefix, ".parquet")
    assert files == [storage.join(prefix, "part-00000.parquet")]
    for paths in (files, [f"{folder}/part-00000.parquet"]):  # URIs or bucket paths, with filesystem=
        rows = ray.data.read_parquet(paths, filesystem=fs).take_all()
        assert [r["id"] for r in rows] == list(range(50))
        assert rows[7]["logprob"] == pytest.approx(-3.5)


def test_ray_train_checkpoint_to_s3(ray_start, prefix, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, storage_path = storage.resolve(storage.join(prefix, "runs"), setting="output_dir")

    def loop(config):
        import tempfile

        import torch

        _without_aws_env()  # a Train worker actor: nothing else runs in it
        weight = torch.full((3,), float(config["value"]))
        with tempfile.TemporaryDirectory() as d:
            torch.save({"weight": weight}, os.path.join(d, "model.pt"))
            ray.train.report({"step": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"value": 2.5},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="tiny", storage_path=storage_path, storage_filesystem=fs),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    assert checkpoint is not None and checkpoint.path.startswith(f"{storage_path}/tiny/")
    assert isinstance(checkpoint.filesystem, pa.fs.S3FileSystem)
    assert storage.is_file(storage.join(prefix, "runs", "tiny", checkpoint.path.rsplit("/", 1)[1], "model.pt"))
    import torch

    local = checkpoint.to_directory(str(tmp_path / "ckpt"))  # download, as trainer.py would
    assert torch.load(os.path.join(local, "model.pt"))["weight"].tolist() == [2.5, 2.5, 2.5]
