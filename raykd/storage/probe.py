"""Probing a storage location before any work: a bounded wait for an answer, and an error that
names the setting and what to fix (:func:`check`)."""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from raykd.storage.locations import Location, StorageError, _scheme, _where, resolve

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
