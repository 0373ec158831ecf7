"""Locations: a location string to a ``(pyarrow.fs.FileSystem, path)`` pair, and what Ray
workers need to resolve one themselves (the package docstring, :mod:`raykd.storage`, has the details)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

Location = str | os.PathLike

# The schemes raykd accepts, and the pyarrow extension module each needs.
_OBJECT_STORES = {"s3": "pyarrow._s3fs", "gs": "pyarrow._gcsfs", "gcs": "pyarrow._gcsfs"}


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
