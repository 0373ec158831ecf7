"""Reading and writing by location: files, JSON, listings, moves and atomic writes (one object
appears complete or not at all)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from raykd.storage.locations import Location, is_uri, resolve

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
