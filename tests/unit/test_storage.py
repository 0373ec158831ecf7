"""raykd.storage on local paths and file:// URIs, and its errors (unknown scheme, missing bucket,
refused keys) naming the setting to fix. The bucket errors use the loopback S3 server of
``tests/s3_server.py``; nothing here starts Ray or leaves the machine."""

from __future__ import annotations

import json
import os
import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raykd import storage
from raykd.storage import StorageError


def test_resolve_local_paths_and_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for location, expected in [
        ("cache", tmp_path / "cache"),
        ("./cache/../runs/", tmp_path / "runs"),
        (tmp_path / "x", tmp_path / "x"),
        ("~/cache", tmp_path / "home" / "cache"),
        (f"file://{tmp_path}/cache", tmp_path / "cache"),
        (f"file://localhost{tmp_path}/cache", tmp_path / "cache"),
    ]:
        fs, path = storage.resolve(location)
        assert isinstance(fs, pafs.LocalFileSystem), location
        assert path == str(expected), location


def test_is_uri_and_join():
    assert storage.is_uri("s3://b/p") and storage.is_uri("file:///tmp/x") and storage.is_uri("gs://b")
    assert not storage.is_uri("/tmp/x") and not storage.is_uri("cache/s3://x") and not storage.is_uri("C://x")
    assert storage.join("s3://b/cache/", "train", "part-0.parquet") == "s3://b/cache/train/part-0.parquet"
    assert (storage.join("s3://b/cache?endpoint_override=127.0.0.1:9000&scheme=http", "ledger.json")
            == "s3://b/cache/ledger.json?endpoint_override=127.0.0.1:9000&scheme=http")
    assert storage.join("s3://b", "x") == "s3://b/x"
    assert storage.join("/tmp/cache", "a", "b.json") == os.path.join("/tmp/cache", "a", "b.json")


def test_local_read_write_list_delete(tmp_path):
    root = str(tmp_path / "cache")
    assert not storage.exists(root)
    assert storage.list_files(root) == []  # a missing folder lists as empty, as a prefix with no keys does
    storage.write_bytes(storage.join(root, "train", "a.bin"), b"abc")  # parent folders are created
    storage.write_json(storage.join(root, "train", "ledger.json"), {"parts": [1, 2]})
    storage.write_bytes(storage.join(root, "train", "sub", "b.bin"), b"12345")
    train = storage.join(root, "train")
    assert storage.exists(train) and not storage.is_file(train)
    assert storage.is_file(storage.join(train, "a.bin"))
    assert storage.file_size(storage.join(train, "sub", "b.bin")) == 5
    assert storage.read_bytes(storage.join(train, "a.bin")) == b"abc"
    assert storage.read_json(storage.join(train, "ledger.json")) == {"parts": [1, 2]}
    assert storage.list_files(train) == [storage.join(train, "a.bin"), storage.join(train, "ledger.json")]
    assert storage.list_files(train, ".bin", recursive=True) == [storage.join(train, "a.bin"),
                                                                 storage.join(train, "sub", "b.bin")]
    with pytest.raises(FileNotFoundError):
        storage.file_size(storage.join(train, "missing.bin"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(train, "missing.bin"))
    storage.delete_dir(train)
    assert not storage.exists(train) and storage.exists(root)
    storage.delete_dir(train)  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.delete_dir(train, missing_ok=False)


def test_file_uri_round_trip(tmp_path):
    location = f"file://{tmp_path}/c/ledger.json"
    storage.write_json(location, {"a": 1})
    assert json.loads((tmp_path / "c" / "ledger.json").read_text()) == {"a": 1}
    assert storage.list_files(f"file://{tmp_path}/c") == [location]


def test_atomic_writes_replace_whole_files_and_leave_no_temp(tmp_path):
    target = str(tmp_path / "ledger.json")
    storage.write_json(target, {"v": 1})
    storage.write_json(target, {"v": 2})
    assert storage.read_json(target) == {"v": 2}
    assert os.listdir(tmp_path) == ["ledger.json"]


def test_write_bytes_atomic_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = str(tmp_path / "ledger.json")
    storage.write_bytes_atomic(target, b"old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(target, b"new")
    assert storage.read_bytes(target) == b"old"
    assert os.listdir(tmp_path) == ["ledger.json"]


def test_open_output_atomic_parquet_and_failure_leaves_nothing(tmp_path):
    table = pa.table({"x": list(range(100))})
    part = storage.join(str(tmp_path), "train", "part-00000.parquet")
    with storage.open_output_atomic(part) as stream, pq.ParquetWriter(stream, table.schema) as writer:
        writer.write_table(table)
    with storage.open_input(part) as f:
        assert pq.read_table(f).equals(table)

    broken = storage.join(str(tmp_path), "train", "part-00001.parquet")
    with pytest.raises(RuntimeError, match="labeler died"), storage.open_output_atomic(broken) as stream:
        stream.write(b"PAR1 half a file")
        raise RuntimeError("labeler died")
    assert not storage.exists(broken)
    assert sorted(os.listdir(tmp_path / "train")) == ["part-00000.parquet"]  # the temp file is gone too

    # replacing an existing part is atomic too (a rename onto the name)
    with storage.open_output_atomic(part) as stream:
        stream.write(b"new")
    assert storage.read_bytes(part) == b"new"


def test_unknown_scheme_and_missing_filesystem_name_the_setting():
    with pytest.raises(StorageError, match=r"labels\.cache_dir='ftp://host/cache'.*not ftp://"):
        storage.resolve("ftp://host/cache", setting="labels.cache_dir")
    # pyarrow can build an HDFS filesystem only with a JVM and libhdfs; raykd does not take hdfs://
    with pytest.raises(StorageError, match=r"output_dir='hdfs://namenode:8020/runs'.*s3:// or gs://"):
        storage.check("hdfs://namenode:8020/runs", setting="output_dir")
    with pytest.raises(StorageError, match=r"labels\.cache_dir.*pyarrow cannot open.*secret_key"):
        storage.resolve("s3://b/c?endpoint_override=127.0.0.1:1&secret_key=x", setting="labels.cache_dir")
    with pytest.raises(StorageError, match=r"'ftp://KEY:\*\*\*@host/c'") as raised:  # no secret in messages
        storage.resolve("ftp://KEY:SECRET@host/c", setting="output_dir")
    assert "SECRET" not in str(raised.value)
    with pytest.raises(StorageError, match="file:///absolute/path"):
        storage.resolve("file://otherhost/cache")
    assert issubclass(StorageError, ValueError)


def test_missing_bucket_and_refused_keys_name_the_setting(s3_server, monkeypatch):
    storage.check(s3_server.uri("cache"), setting="labels.cache_dir")  # the real bucket passes
    with pytest.raises(StorageError, match=r"labels\.cache_dir='s3://no-such-bucket/cache'.*'no-such-bucket' does not exist"):
        storage.check("s3://no-such-bucket/cache", setting="labels.cache_dir")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=r"output_dir=.*denied.*AWS_ACCESS_KEY_ID"):
        storage.check(s3_server.uri("runs"), setting="output_dir")


def test_s3_filesystem_pickles_with_endpoint_and_keys(s3_server):
    fs, path = storage.resolve(s3_server.uri("cache/"))
    assert path == f"{s3_server.bucket}/cache"
    _, (options,) = pickle.loads(pickle.dumps(fs)).__reduce__()
    assert options["endpoint_override"] == s3_server.endpoint
    assert (options["access_key"], options["secret_key"]) == (s3_server.access_key, s3_server.secret_key)
    # endpoint and region in the URI instead of the environment
    host = s3_server.endpoint.removeprefix("http://")
    fs, path = storage.resolve(f"s3://{s3_server.bucket}/cache?endpoint_override={host}&scheme=http&region=us-east-1")
    _, (options,) = fs.__reduce__()
    assert (options["endpoint_override"], options["scheme"], path) == (host, "http", f"{s3_server.bucket}/cache")
