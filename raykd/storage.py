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

Object stores are not file systems (see the notes on each helper): there are no real folders
(a "folder" exists while some key starts with its prefix), listings are of keys under a prefix,
and there is no rename (a move is a copy then a delete). A single object, though, becomes visible
all at once, complete or not at all, which is what :func:`write_bytes_atomic` and
:func:`open_output_atomic` build on.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

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
]

Location = str | os.PathLike

# The schemes raykd accepts, and the pyarrow extension module each needs.
_OBJECT_STORES = {"s3": "pyarrow._s3fs", "gs": "pyarrow._gcsfs", "gcs": "pyarrow._gcsfs"}
_ACCESS_ERRORS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN",
                  "HTTP status 403", "HTTP status 401", "Unauthorized", "Forbidden")
_CREDENTIAL_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a "
                    "non-AWS server), or pass them to Ray workers with runtime_env env_vars")
_GCS_CREDENTIAL_HINT = ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (on every node), "
                        "or run `gcloud auth application-default login`")
_GCS_NO_CREDENTIALS = ("OAuth2 access token", "credentials", "UNAUTHENTICATED")

PROBE_TIMEOUT_ENV = "RAYKD_STORAGE_TIMEOUT_S"
"""Environment variable: seconds :func:`check` waits for a storage location to answer (default
:data:`DEFAULT_PROBE_TIMEOUT_S`; tests set a few seconds)."""
DEFAULT_PROBE_TIMEOUT_S = 30.0


class StorageError(ValueError):
    """A storage location that cannot be used: unknown scheme, filesystem not built into this
    pyarrow, missing bucket, no access. The message names the setting to fix when known."""


def _redacted(location: Location) -> str:
    """The location without a secret in its user part (``s3://KEY:SECRET@bucket``)."""
    text = str(location)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname or ''}"))


def _where(location: Location, setting: str | None) -> str:
    return f"{setting}={_redacted(location)!r}" if setting else repr(_redacted(location))


def is_uri(location: Location) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a local path.

    A one-letter scheme is taken as a Windows drive (``C:\\...``), not a URI.
    """
    if isinstance(location, os.PathLike):
        return False
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


def _scheme(location: Location) -> str:
    return str(location).partition("://")[0].lower() if is_uri(location) else ""


def _local_path(location: Location) -> str:
    text = str(location)
    if _scheme(text) == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {text!r} names host {parts.netloc!r}: use file:///absolute/path")
        text = parts.path
    return str(Path(text).expanduser().resolve())


def resolve(location: Location, *, setting: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Turn a location into a filesystem and a path on it.

    Local paths are expanded (``~``) and made absolute; ``file://`` URIs become local paths;
    ``s3://`` and ``gs://`` URIs become pyarrow filesystems with the bucket-prefixed path
    (``"bucket/prefix"``, the form ``RunConfig(storage_filesystem=...)`` and
    ``read_parquet(filesystem=...)`` expect). Makes no request, except that pyarrow asks AWS for
    a bucket's region when neither a region nor an endpoint is configured.

    Args:
        location: a local path, ``file://``, ``s3://`` or ``gs://`` URI (S3 options in the query,
            see the module docstring).
        setting: the config field the location came from (e.g. ``"labels.cache_dir"``), named in
            error messages.

    Returns:
        ``(filesystem, path)``; for S3 with keys in ``AWS_ACCESS_KEY_ID`` /
        ``AWS_SECRET_ACCESS_KEY`` the filesystem carries them explicitly, so it pickles to Ray
        workers with its keys.

    Raises:
        StorageError: an unknown scheme, a filesystem this pyarrow was not built with or cannot
            load (``hdfs://`` without libhdfs), or a URI pyarrow rejects (bad query parameter).
    """
    scheme = _scheme(location)
    if not scheme or scheme == "file":
        return pafs.LocalFileSystem(), _local_path(location)
    where = _where(location, setting)
    if scheme not in _OBJECT_STORES:
        raise StorageError(
            f"{where}: raykd stores to local paths, file://, s3:// or gs:// URIs, not {scheme}://; "
            "use one of those (a shared mount is a local path)"
        )
    try:
        __import__(_OBJECT_STORES[scheme])
    except ImportError as e:
        raise StorageError(
            f"{where}: this pyarrow {pa.__version__} is built without {scheme}:// support ({e}); "
            "install a pyarrow wheel with it (the PyPI wheels include S3 and GCS) or use another location"
        ) from e
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise StorageError(f"{where}: pyarrow cannot open this location: {e}") from e
    if isinstance(fs, pafs.S3FileSystem):
        fs = _with_explicit_keys(fs)
    return fs, path.rstrip("/")


def _with_explicit_keys(fs: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """The same S3 filesystem with the environment's keys made explicit (so they pickle)."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    _, (options,) = fs.__reduce__()
    if not key or not secret or options["access_key"] or options["anonymous"] or options["role_arn"]:
        return fs
    options.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN", ""))
    return pafs.S3FileSystem(**options)


_FORWARDED_ENV = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS")


def worker_env() -> dict[str, str]:
    """The storage credentials and endpoints of this process's environment (``AWS_*``,
    ``GOOGLE_APPLICATION_CREDENTIALS``), for the ``runtime_env`` of Ray tasks and actors that
    resolve locations themselves (labelers read their parts by location). Empty when none is set.

    Workers of a cluster started before these variables were set would otherwise not see them.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}


def remote_args() -> dict[str, Any]:
    """Ray remote options that forward :func:`worker_env` (``{}`` when there is nothing to forward)."""
    env = worker_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def seconds_from_env(name: str, default: float, error: type[Exception] = ValueError) -> float:
    """A positive number of seconds from environment variable ``name`` (``default`` when unset).

    Raises:
        error: the variable is not a number of seconds above 0.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise error(f"{name}={raw!r} must be a number of seconds above 0")
    return seconds


def probe_timeout_s() -> float:
    """Seconds :func:`check` waits for a location to answer: ``$RAYKD_STORAGE_TIMEOUT_S``, else 30.

    Raises:
        StorageError: the variable is not a number of seconds above 0.
    """
    return seconds_from_env(PROBE_TIMEOUT_ENV, DEFAULT_PROBE_TIMEOUT_S, StorageError)


def _within(seconds: float, call: Any) -> Any:
    """``call()`` in a daemon thread; its result, or its exception re-raised here.

    Raises:
        TimeoutError: no answer within ``seconds`` (the thread is left to finish on its own).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="raykd-storage-probe")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _probe_uri(location: Location, seconds: float) -> str:
    """The location the probe resolves: a ``gs://`` one with pyarrow's retries capped at the
    deadline (without credentials its GCS client otherwise retries for minutes)."""
    text = str(location)
    if _scheme(text) not in ("gs", "gcs") or "retry_limit_seconds" in text:
        return text
    parts = urlsplit(text)
    query = "&".join(q for q in (parts.query, f"retry_limit_seconds={max(seconds / 2, 1):g}") if q)
    return urlunsplit(parts._replace(query=query))


def check(location: Location, *, setting: str | None = None) -> None:
    """Fail fast on a location that cannot be used, with one cheap request (a bucket lookup)
    that must answer within :func:`probe_timeout_s` seconds (30 by default).

    Call it once at the start of a job for each configured location, on the driver, before Ray
    starts. Local paths are not checked (folders are created on write).

    Args:
        location: as for :func:`resolve`.
        setting: the config field the location came from, named in error messages.

    Raises:
        StorageError: as :func:`resolve`; the bucket does not exist; access denied (missing or
            wrong credentials); the endpoint cannot be reached; no answer within the deadline.
    """
    fs, path = resolve(location, setting=setting)
    if isinstance(fs, pafs.LocalFileSystem):
        return
    seconds = probe_timeout_s()
    fs, path = resolve(_probe_uri(location, seconds), setting=setting)
    bucket = path.split("/", 1)[0]
    where = _where(location, setting)
    try:
        info = _within(seconds, lambda: fs.get_file_info(bucket))
    except TimeoutError as e:
        raise StorageError(_no_answer(location, where, bucket, seconds)) from e
    except OSError as e:
        raise StorageError(_refused(location, where, bucket, str(e))) from e
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{where}: bucket {bucket!r} does not exist; create it or point the setting at another bucket")


def _refused(location: Location, where: str, bucket: str, message: str) -> str:
    """The message for a bucket lookup that failed: credentials, access, or the endpoint."""
    if _scheme(location) in ("gs", "gcs"):
        if any(text in message for text in _GCS_NO_CREDENTIALS):
            return f"{where}: no usable Google Cloud credentials for bucket {bucket!r}; {_GCS_CREDENTIAL_HINT} ({message[:300]})"
        return f"{where}: cannot reach bucket {bucket!r} ({message[:300]}); {_GCS_CREDENTIAL_HINT}"
    if any(code in message for code in _ACCESS_ERRORS):
        return f"{where}: access to bucket {bucket!r} denied ({message}); {_CREDENTIAL_HINT}"
    return (f"{where}: cannot reach bucket {bucket!r} ({message}); check the endpoint "
            f"(AWS_ENDPOINT_URL or ?endpoint_override=) and the credentials: {_CREDENTIAL_HINT}")


def _no_answer(location: Location, where: str, bucket: str, seconds: float) -> str:
    """The message for a bucket lookup that did not answer within the deadline."""
    if _scheme(location) in ("gs", "gcs"):
        found = "" if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") else " (GOOGLE_APPLICATION_CREDENTIALS is not set)"
        hint = f"check the credentials{found}: {_GCS_CREDENTIAL_HINT}"
    else:
        hint = f"check the endpoint (AWS_ENDPOINT_URL or ?endpoint_override=) and the credentials: {_CREDENTIAL_HINT}"
    return (f"{where}: no answer from bucket {bucket!r} within {seconds:g} s; {hint}; "
            f"{PROBE_TIMEOUT_ENV} sets the deadline")


def join(location: Location, *names: str) -> str:
    """Append path parts to a location, keeping a URI's scheme, bucket and query.

    ``join("s3://b/cache?scheme=http", "train", "part-0.parquet")`` is
    ``"s3://b/cache/train/part-0.parquet?scheme=http"``; local paths join with ``os.path.join``
    (not expanded: :func:`resolve` does that).
    """
    if not is_uri(location):
        return os.path.join(location, *names)
    parts = urlsplit(str(location))
    path = "/".join([parts.path.rstrip("/"), *(n.strip("/") for n in names)])
    return urlunsplit(parts._replace(path=path))


def file_info(location: Location) -> pafs.FileInfo:
    """pyarrow's ``FileInfo`` of a location (``type``, ``size``, ``is_file``; ``NotFound`` when absent)."""
    fs, path = resolve(location)
    return fs.get_file_info(path)


_info = file_info


def is_dir(location: Location) -> bool:
    """Whether ``location`` is a folder (on an object store: a prefix with keys under it)."""
    return _info(location).type == pafs.FileType.Directory


def delete_file(location: Location) -> None:
    """Delete one file (object).

    Raises:
        FileNotFoundError: no file there.
    """
    fs, path = resolve(location)
    fs.delete_file(path)


def exists(location: Location) -> bool:
    """Whether a file or folder exists (on an object store: a key, or a prefix with keys under it)."""
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    """Whether ``location`` is a file (an object, on an object store)."""
    return _info(location).type == pafs.FileType.File


def file_size(location: Location) -> int:
    """Size of a file in bytes.

    Raises:
        FileNotFoundError: no file there.
    """
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {str(location)!r}")
    return int(info.size)


def list_files(location: Location, suffix: str = "", *, recursive: bool = False) -> list[str]:
    """Files under a folder, sorted by location.

    Names starting with ``.`` (the temporary files of :func:`open_output_atomic`) are skipped.
    On an object store this lists the keys under the prefix ``location/``; a missing folder
    (no key under it) gives ``[]``, as a missing local folder does.

    Args:
        location: the folder.
        suffix: keep only names ending with it (e.g. ``".parquet"``).
        recursive: also list files in sub-folders.

    Returns:
        The files as locations of the same form as ``location`` (a URI stays a URI with its query).
    """
    fs, root = resolve(location)
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=recursive)
    found = []
    for info in fs.get_file_info(selector):
        relative = info.path[len(root):].lstrip("/")
        if info.type == pafs.FileType.File and not info.base_name.startswith(".") and info.base_name.endswith(suffix):
            found.append(join(location, *relative.split("/")))
    return sorted(found)


def open_input(location: Location) -> pa.NativeFile:
    """A random-access reader (for ``pyarrow.parquet.ParquetFile`` and ``read_table``).

    Raises:
        FileNotFoundError: no file there.
    """
    fs, path = resolve(location)
    return fs.open_input_file(path)


def open_output(location: Location) -> pa.NativeFile:
    """A writer that replaces the file (local parent folders are created).

    Not atomic: a reader may see a partial local file, and on S3 closing the stream, which
    ``with`` does also on an exception, completes the upload with what was written so far.
    Use :func:`open_output_atomic` for files readers must never see half-written.
    """
    fs, path = resolve(location)
    _make_parent(fs, path)
    return fs.open_output_stream(path)


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)


@contextlib.contextmanager
def open_output_atomic(location: Location) -> Iterator[pa.NativeFile]:
    """A writer whose file appears at ``location`` complete, or not at all.

    Writes ``.<name>.<random>.tmp`` in the same folder, then moves it into place when the block
    ends without an exception, or deletes it when it raises. Locally the move is a rename
    (atomic, replacing any old file). On S3 it is a server-side copy then a delete: the final
    object still appears all at once (one copy makes one object), but a crash between the two
    steps can leave the temporary object behind (hidden from :func:`list_files`).

    Yields:
        The output stream (e.g. for ``pyarrow.parquet.ParquetWriter(stream, schema)``).
    """
    fs, path = resolve(location)
    folder, name = os.path.split(path)
    temp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    _make_parent(fs, path)
    with _replaced_on_success(lambda: fs.move(temp, path), lambda: fs.delete_file(temp)):
        with fs.open_output_stream(temp) as stream:
            yield stream


@contextlib.contextmanager
def _replaced_on_success(commit: Callable[[], None], discard: Callable[[], None]) -> Iterator[None]:
    """The commit step of both atomic writers: after a block that writes a temporary file,
    ``commit()`` moves it onto its name; if the block or the move raises, ``discard()`` deletes
    it (an ``OSError`` there is ignored) and the error goes on."""
    try:
        yield
        commit()
    except BaseException:
        with contextlib.suppress(OSError):
            discard()
        raise


def read_bytes(location: Location) -> bytes:
    """The whole file.

    Raises:
        FileNotFoundError: no file there.
    """
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.readall()


def write_bytes(location: Location, data: bytes) -> None:
    """Write a whole file (local parent folders are created). Not atomic locally: see
    :func:`write_bytes_atomic`."""
    with open_output(location) as stream:
        stream.write(data)


def write_bytes_atomic(location: Location, data: bytes) -> None:
    """Write a whole file so readers see the old content or the new, never a mix.

    Local: a temporary file in the same folder, flushed and ``os.replace``-d onto the name.
    Object stores: a single upload of the whole object; S3 and GCS make an object visible all
    at once, only when its upload completes, so no temporary key (and no copy) is needed.
    """
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as stream:
            stream.write(data)  # one write, then close: nothing is visible before the upload completes
        return
    _make_parent(fs, path)
    temp = f"{path}.{uuid.uuid4().hex}.tmp"
    with _replaced_on_success(lambda: os.replace(temp, path), lambda: os.remove(temp)), open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_json(location: Location) -> Any:
    """Parse a JSON file.

    Raises:
        FileNotFoundError: no file there.
        json.JSONDecodeError: the file is not JSON.
    """
    return json.loads(read_bytes(location))


def write_json(location: Location, value: Any, *, indent: int | None = 2) -> None:
    """Write ``value`` as JSON, atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(location, json.dumps(value, indent=indent).encode())


def move(source: Location, target: Location) -> None:
    """Move a file, replacing ``target`` (local: a rename, parent folders created; on an object
    store: a server-side copy then a delete). Both locations must be on the same filesystem.

    Raises:
        FileNotFoundError: no file at ``source``.
    """
    fs, path = resolve(source)
    _, to = resolve(target)
    _make_parent(fs, to)
    fs.move(path, to)


def delete_dir(location: Location, *, missing_ok: bool = True) -> None:
    """Delete a folder and everything under it (on an object store: every key under the prefix).

    Raises:
        FileNotFoundError: the folder does not exist and ``missing_ok`` is false.
    """
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        if missing_ok:
            return
        raise FileNotFoundError(f"no folder at {str(location)!r}")
    fs.delete_dir(path)
