"""Storage by location: local paths, ``file://``, ``s3://`` and ``gs://`` through ``pyarrow.fs``.

The one place raykd turns a location string (the soft-label cache root ``labels.cache_dir``, the
run output folder, Ray Train's checkpoint storage) into a ``(pyarrow.fs.FileSystem, path)`` pair.
Every other module reads and writes through the helpers here, so a cache written by one node is
read by workers on the others when the location is an object store.

Locations:
    * a local path (``~`` expanded, made absolute) or ``file:///abs/path``: :class:`LocalFileSystem`;
    * ``s3://bucket/prefix``: :class:`S3FileSystem` (AWS or any S3-compatible server);
    * ``gs://bucket/prefix``: :class:`GcsFileSystem` (when this pyarrow is built with GCS).
    Anything else (``hdfs://`` without libhdfs, an unknown scheme, a filesystem this pyarrow was not
    built with) raises :class:`StorageError` naming the setting to fix, before any work starts.

S3 endpoint and credentials (checked with pyarrow 26.0 against a MinIO-compatible test server):
    * Environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``),
      ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:9000``; pyarrow's
      ``FileSystem.from_uri`` honours both, a bare ``S3FileSystem()`` does not), ``AWS_REGION`` /
      ``AWS_DEFAULT_REGION``, or a profile in ``~/.aws``; on EC2 or EKS the instance or pod role.
    * URI query parameters, which take precedence:
      ``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1``.
      Keys cannot go in the query (pyarrow rejects ``access_key=``); they may go in the user part,
      ``s3://KEY:SECRET@bucket/prefix``, which then shows in logs: prefer the environment.
    :func:`resolve` works with both. When the keys come from ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, it builds the filesystem with them explicitly, so the returned object
    pickles *with* its endpoint and keys (pyarrow pickles a default-chain filesystem without keys,
    and each process then looks them up again in its own environment).

How Ray workers on other nodes get the credentials:
    * Passing the filesystem object (``ray.data.read_parquet(paths, filesystem=fs)``,
      ``RunConfig(storage_path=path, storage_filesystem=fs)``, or as a task argument) ships the
      endpoint and, when resolved from ``AWS_*`` keys, the keys with it: nothing else is needed.
    * Code that resolves a location string on the worker (``resolve(cache_dir)`` inside a task)
      reads the worker's environment: start the job with
      ``ray.init(runtime_env={"env_vars": {"AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...,
      "AWS_ENDPOINT_URL": ...}})`` or ``ray job submit --runtime-env-json`` with the same
      ``env_vars``, or rely on node roles (IAM instance profile, GKE workload identity).
      Both ways put the secret where the cluster can read it (Ray's object store or GCS): use
      short-lived keys scoped to the bucket.
    * ``gs://``: pyarrow's GCS filesystem reads Google's default credentials on each process
      (``GOOGLE_APPLICATION_CREDENTIALS`` naming a key file present on every node, or workload
      identity); pass the variable in ``runtime_env`` ``env_vars`` like the AWS ones.

Modules: :mod:`~raykd.storage.locations` (a location to a filesystem and path, credentials for
workers), :mod:`~raykd.storage.probe` (:func:`check`, before any work) and
:mod:`~raykd.storage.files` (reads, writes, listings, atomic writes); every name is importable
from ``raykd.storage``.

Object stores are not file systems (see the notes on each helper): there are no real folders
(a "folder" exists while some key starts with its prefix), listings are of keys under a prefix,
and there is no rename (a move is a copy then a delete). A single object, though, becomes visible
all at once, complete or not at all, which is what :func:`write_bytes_atomic` and
:func:`open_output_atomic` build on.
"""

from __future__ import annotations

from raykd.storage.files import (
    delete_dir,
    delete_file,
    exists,
    file_info,
    file_size,
    is_dir,
    is_file,
    join,
    list_files,
    move,
    open_input,
    open_output,
    open_output_atomic,
    read_bytes,
    read_json,
    write_bytes,
    write_bytes_atomic,
    write_json,
)
from raykd.storage.locations import Location, StorageError, is_uri, remote_args, resolve, worker_env
from raykd.storage.probe import (
    DEFAULT_PROBE_TIMEOUT_S,
    PROBE_TIMEOUT_ENV,
    check,
    probe_timeout_s,
    seconds_from_env,
)
__all__ = [
    "StorageError",
    "check",
    "delete_dir",
    "exists",
    "file_size",
    "is_file",
    "is_uri",
    "join",
    "list_files",
    "move",
    "open_input",
    "open_output",
    "open_output_atomic",
    "read_bytes",
    "read_json",
    "resolve",
    "write_bytes",
    "write_bytes_atomic",
    "write_json",
    "Location", "DEFAULT_PROBE_TIMEOUT_S", "PROBE_TIMEOUT_ENV", "delete_file", "file_info", "is_dir",
    "probe_timeout_s", "remote_args", "seconds_from_env", "worker_env",
]
