"""Stream documents from the source a :class:`~raykd.config.DataConfig` names, one *part* at a time.

A source is cut into deterministic parts before anything is labeled: row ranges of
``data.part_docs`` rows of each JSONL or Parquet file (or ``datasets`` dataset), and groups of
``data.part_docs`` files of a text folder. :func:`plan_parts` reads only metadata (Parquet
footers, file sizes; for JSONL one scan per file that records where every ``part_docs``-th line
starts, run in Ray tasks when Ray is up), so the driver holds one small :class:`PartSpec` per
part and never a document. :func:`read_part` reads one part's documents where it runs (a labeler
actor on any node); locations may be local paths or URIs (``s3://``, ``gs://``) through
:mod:`raykd.storage`.

Sources: ``bbc`` (the installed BBC News corpus, a built-in text source), ``jsonl``,
``parquet``, ``text`` (a folder of ``*.txt`` files, one document each) and ``hf`` (a folder
written by ``datasets.save_to_disk``, or anything ``datasets.load_dataset`` accepts). Every
check that can fail before labeling (path, columns, duplicate ids) fails with a message that
names the setting to change.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raykd import storage
from raykd.data.bbc import bbc_news_folder, read_article, topic_of_folder
from raykd.data.documents import Document

if TYPE_CHECKING:
    from raykd.config import DataConfig

logger = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")


class DataError(ValueError):
    """A source row or dataset that cannot be used (a null id, a text that is not a string, an id
    that repeats, a line that is not JSON, a split the dataset lacks): a user error wherever it is
    raised, in the driver or in a Ray task (:data:`raykd.console.USER_ERROR_TYPES`); the message
    names the file and row."""
_HF_SAVED_MARKERS = ("state.json", "dataset_dict.json")
_SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet", "text": ".txt", "bbc": ".txt"}


@dataclass(frozen=True)
class PartSpec:
    """One deterministic part of a source: what a labeler reads, labels and commits as a unit.

    Attributes:
        source: ``jsonl``, ``parquet``, ``text``, ``bbc`` or ``hf``.
        location: the file (``jsonl``/``parquet``), the folder (``text``/``bbc``) or the
            dataset (``hf``), as a path or URI.
        name: the file's path under ``data.path`` (``jsonl``/``parquet``), or the folder's or
            dataset's name: ids without an id column are ``<name>:<row>``.
        start: first row of the part (for text: index of its first file in sorted order).
        stop: one past its last row.
        byte_start: JSONL only: byte offset of row ``start``.
        byte_stop: JSONL only: byte offset one past row ``stop - 1``'s line.
        line_start: JSONL only: line number (from 1, blank lines counted) of row ``start``.
        size: identity of the input at planning time (file size in bytes; for text the summed
            size of the part's files; for ``hf`` a hash of the dataset's fingerprint). A changed
            input gives a new part (and a new digest), never a rewritten one.
        files: text only: the part's files, relative to ``location``.
    """

    source: str
    location: str
    name: str
    start: int
    stop: int
    byte_start: int = 0
    byte_stop: int = 0
    line_start: int = 1
    size: int = -1
    files: tuple[str, ...] = field(default_factory=tuple)

    @property
    def part_id(self) -> str:
        """Readable identity, e.g. ``articles.jsonl:1000-2000``."""
        return f"{self.name}:{self.start}-{self.stop}"

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def digest(self) -> str:
        """16 hex characters naming the part's shards and ledger entry (changes with ``size``)."""
        blob = json.dumps([self.source, self.name, self.start, self.stop, self.size, list(self.files)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_row(self) -> dict[str, Any]:
        """A flat dict (Ray Data row); :meth:`from_row` inverts it."""
        row = asdict(self)
        row["files"] = json.dumps(list(self.files))
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PartSpec:
        values = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items() if k in cls.__dataclass_fields__}
        values["files"] = tuple(json.loads(values.get("files") or "[]"))
        return cls(**values)


def source_identity(cfg: DataConfig) -> dict[str, Any]:
    """What names the source in a cache key: kind, location and columns (not the content:
    each part's content is fingerprinted in the ledger)."""
    if cfg.source == "bbc":
        return {"source": "bbc"}
    return {"source": cfg.source, "path": cfg.path, "text_column": cfg.text_column, "id_column": cfg.id_column,
            **({"hf_split": cfg.hf_split} if cfg.source == "hf" else {})}


# ---------------------------------------------------------------------------------------------
# Planning: metadata only.


def plan_parts(cfg: DataConfig) -> list[PartSpec]:
    """Cut the source into parts from metadata, without reading any document on the driver.

    Returns:
        Parts in source order (files sorted by name, rows in file order).

    Raises:
        FileNotFoundError: the path does not exist, a glob matches nothing, or a folder holds
            no file of the source's type.
        ValueError: the text or id column is missing (the message lists the columns there are).
        raykd.storage.StorageError: the location's filesystem is not available.
    """
    if cfg.source in ("bbc", "text"):
        return _text_parts(cfg)
    if cfg.path is None:
        raise ValueError(f"data.path is required for data.source={cfg.source!r}")
    if cfg.source == "hf":
        return _hf_parts(cfg)
    files = _resolve_files(cfg.path, _SUFFIX[cfg.source], cfg.source)
    root = _common_root(cfg.path)
    if cfg.source == "parquet":
        return [p for f in files for p in _parquet_parts(f, _relative(f, root), cfg)]
    scanned = _map(_jsonl_parts, [(f, _relative(f, root), cfg.part_docs) for f in files])
    for f, (_, keys) in zip(files, scanned):
        if keys:
            _check_columns(keys, cfg, f"{f} (first record)")
    return [p for parts, _ in scanned for p in parts]


def _map(fn, args: list[tuple]) -> list:
    """``fn(*a)`` for each ``a``: in Ray tasks when Ray is up (the scans run where the cluster
    has cores, and only their small results come back), else in this process."""
    import ray

    if not ray.is_initialized() or len(args) < 2:
        return [fn(*a) for a in args]
    remote = ray.remote(num_cpus=0.25, **storage.remote_args())(fn)
    return ray.get([remote.remote(*a) for a in args])


def _resolve_files(path: str, suffix: str, source: str) -> list[str]:
    """A file, the sorted matches of a local glob (``**`` recurses), or the ``*<suffix>`` files of a folder."""
    if not storage.is_uri(path) and _GLOB_CHARS & set(path):
        expanded = str(Path(path).expanduser())
        files = sorted(p for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data.path={path!r} matches no file; fix the pattern in data.path")
        return files
    info = storage.file_info(path)
    if info.is_file:
        return [path if storage.is_uri(path) else str(Path(path).expanduser())]
    if storage.is_dir(path):
        files = storage.list_files(path, suffix)
        if not files:
            raise FileNotFoundError(
                f"the folder data.path={path!r} holds no *{suffix} file; point data.path at a "
                f"{source} file, a glob such as '{path.rstrip('/')}/**/*{suffix}', or another folder"
            )
        return files
    raise FileNotFoundError(f"data.path={path!r} does not exist; set data.path to a {source} file, glob or folder")


def _common_root(path: str) -> str:
    """The folder names are relative to: the path itself for a folder, else its parent (glob: the part before the pattern)."""
    if not storage.is_uri(path) and _GLOB_CHARS & set(path):
        head = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)]
        return str(Path(head).expanduser()) if head.endswith("/") else str(Path(head).expanduser().parent)
    return path.rstrip("/") if storage.is_dir(path) else path.rstrip("/").rsplit("/", 1)[0]


def _relative(file: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    return file[len(root) :] if file.startswith(root) else file.rsplit("/", 1)[-1]


def _missing_column(column: str, setting: str, columns, where: object) -> ValueError:
    names = ", ".join(repr(c) for c in columns) or "none"
    return ValueError(f"{where} has no column {column!r} (columns: {names}); set data.{setting}=<name> to one of them")


def _check_columns(names, cfg: DataConfig, where: object) -> None:
    for column, setting in ((cfg.text_column, "text_column"), (cfg.id_column, "id_column")):
        if column is not None and column not in names:
            raise _missing_column(column, setting, names, where)


def _parquet_parts(file: str, name: str, cfg: DataConfig) -> list[PartSpec]:
    import pyarrow.parquet as pq

    with storage.open_input(file) as f:
        meta = pq.read_metadata(f)
    _check_columns(meta.schema.to_arrow_schema().names, cfg, file)
    size = storage.file_size(file)
    n, step = meta.num_rows, cfg.part_docs
    return [PartSpec("parquet", file, name, a, min(a + step, n), size=size) for a in range(0, n, step)]


def _jsonl_parts(file: str, name: str, part_docs: int) -> tuple[list[PartSpec], list[str]]:
    """Scan a JSONL file once for the byte offset of every ``part_docs``-th non-blank line.

    Returns:
        ``(parts, the keys of the file's first record)``, so columns can be checked before labeling.
    """
    offsets, row, pos, line_no, keys = [], 0, 0, 0, None
    with storage.open_input(file) as f:
        for line in _lines(f):
            line_no += 1
            if line.strip():
                if keys is None:
                    try:
                        record = json.loads(line)
                        keys = list(record) if isinstance(record, dict) else []
                    except json.JSONDecodeError:
                        keys = []  # read_part names the line
                if row % part_docs == 0:
                    offsets.append((row, pos, line_no))
                row += 1
            pos += len(line)
    size = pos
    bounds = offsets + [(row, size, line_no + 1)]
    return [PartSpec("jsonl", file, name, a, b, byte_start=pa_, byte_stop=pb, line_start=la, size=size)
            for (a, pa_, la), (b, pb, _) in zip(bounds, bounds[1:])], keys or []


def _lines(f, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary stream, each with its ``\\n`` (the last one may lack it)."""
    rest = b""
    while data := f.read(chunk):
        data = rest + data
        *lines, rest = data.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _text_parts(cfg: DataConfig) -> list[PartSpec]:
    if cfg.source == "bbc":
        folder, name = str(bbc_news_folder()), "bbc"
    else:
        folder = cfg.path  # type: ignore[assignment]
        if not storage.is_dir(folder):
            raise FileNotFoundError(f"data.path={folder!r} is not a folder; set data.path to a folder of *.txt files")
        name = folder.rstrip("/").rsplit("/", 1)[-1]
    fs, root = storage.resolve(folder)
    from pyarrow.fs import FileSelector, FileType

    infos = sorted((i for i in fs.get_file_info(FileSelector(root, recursive=True))
                    if i.type == FileType.File and i.path.endswith(".txt")), key=lambda i: i.path)
    if not infos:
        raise FileNotFoundError(f"the folder {folder!r} holds no *.txt file; set data.path to a folder of text files")
    rel = [i.path[len(root.rstrip("/")) + 1 :] for i in infos]
    step = cfg.part_docs
    return [
        PartSpec(cfg.source, folder, name, a, min(a + step, len(rel)), size=sum(i.size for i in infos[a : a + step]),
                 files=tuple(rel[a : a + step]))
        for a in range(0, len(rel), step)
    ]


def _load_hf(path: str, split: str) -> Any:
    """A ``datasets.Dataset`` (memory-mapped Arrow): ``load_from_disk`` for a saved folder, else ``load_dataset``."""
    import datasets

    folder = Path(path).expanduser()
    if folder.is_dir() and any((folder / m).is_file() for m in _HF_SAVED_MARKERS):
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"the saved dataset {path!r} has no split {split!r} (splits: {', '.join(ds)}); "
                                 "set data.hf_split=<split>")
            ds = ds[split]
        elif split != "train":  # the default: a single saved Dataset is read whole, as its one split
            raise DataError(f"data.hf_split={split!r} does not apply: {path!r} is one saved Dataset, without splits; "
                            "remove data.hf_split (the whole dataset is read), or save a DatasetDict")
        return ds
    looks_local = path.startswith(("/", "./", "../", "~")) or folder.suffix in (".json", ".jsonl", ".parquet")
    if looks_local and not folder.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist; set data.path to a saved dataset folder")
    return datasets.load_dataset(path, split=split)


def _hf_parts(cfg: DataConfig) -> list[PartSpec]:
    ds = _load_hf(cfg.path, cfg.hf_split)  # type: ignore[arg-type]
    _check_columns(ds.column_names, cfg, f"the dataset {cfg.path!r}")
    name = cfg.path.rstrip("/").rsplit("/", 1)[-1]  # type: ignore[union-attr]
    size = int(hashlib.sha256(str(getattr(ds, "_fingerprint", ds.num_rows)).encode()).hexdigest()[:12], 16)
    n, step = ds.num_rows, cfg.part_docs
    return [PartSpec("hf", cfg.path, name, a, min(a + step, n), size=size) for a in range(0, n, step)]  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Reading one part: runs where the labeler runs.


def read_part(spec: PartSpec, cfg: DataConfig) -> dict[str, np.ndarray]:
    """The documents of one part, checked.

    Args:
        spec: from :func:`plan_parts`.
        cfg: the data settings the part was planned with (columns).

    Returns:
        ``doc_id`` and ``text``, object arrays ``[D]`` in source order (plus ``label`` for
        ``bbc``). Rows with empty or null text are skipped (and counted in the log).

    Raises:
        ValueError: a text value is not a string, an id is null, two rows of the part share an
            id, or a JSONL line is not a JSON object (the message names the file and line).
    """
    if spec.source in ("text", "bbc"):
        return _text_rows(spec)
    if spec.source == "jsonl":
        rows = _jsonl_rows(spec, cfg)
    elif spec.source == "parquet":
        rows = _parquet_rows(spec, cfg)
    else:
        rows = _hf_rows(spec, cfg)
    return _checked(rows, spec, cfg)


def _jsonl_rows(spec: PartSpec, cfg: DataConfig) -> Iterator[tuple[str, Any, Any]]:
    with storage.open_input(spec.location) as f:
        f.seek(spec.byte_start)
        data = f.read(spec.byte_stop - spec.byte_start)
    row = spec.start
    for line_no, line in enumerate(data.split(b"\n"), start=spec.line_start):
        if not line.strip():
            continue
        where = f"{spec.name}:{line_no} (row {row})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise DataError(f"{where} is a JSON {type(record).__name__}, expected an object")
        for column, setting in ((cfg.text_column, "text_column"), (cfg.id_column, "id_column")):
            if column is not None and column not in record and row == spec.start:
                raise _missing_column(column, setting, record, spec.location)
        yield where, _doc_id(record.get(cfg.id_column) if cfg.id_column else None, cfg.id_column, spec.name, row), record.get(cfg.text_column)
        row += 1


def _parquet_rows(spec: PartSpec, cfg: DataConfig) -> Iterator[tuple[str, Any, Any]]:
    import pyarrow.parquet as pq

    columns = [cfg.text_column] + ([cfg.id_column] if cfg.id_column else [])
    with storage.open_input(spec.location) as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for g in range(pf.num_row_groups):  # the row groups that hold [start, stop)
            n = pf.metadata.row_group(g).num_rows
            if offset + n > spec.start and offset < spec.stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups, columns=columns).slice(spec.start - (first or 0), spec.rows)
    texts = table.column(cfg.text_column).to_pylist()
    ids = table.column(cfg.id_column).to_pylist() if cfg.id_column else [None] * len(texts)
    for i, (text, id_value) in enumerate(zip(texts, ids)):
        row = spec.start + i
        yield f"{spec.name} row {row}", _doc_id(id_value, cfg.id_column, spec.name, row), text


def _hf_rows(spec: PartSpec, cfg: DataConfig) -> Iterator[tuple[str, Any, Any]]:
    ds = _load_hf(spec.location, cfg.hf_split).select(range(spec.start, spec.stop))
    texts = ds[cfg.text_column]
    ids = ds[cfg.id_column] if cfg.id_column else [None] * len(texts)
    for i, (text, id_value) in enumerate(zip(texts, ids)):
        row = spec.start + i
        yield f"{spec.name} row {row}", _doc_id(id_value, cfg.id_column, spec.name, row), text


def _text_rows(spec: PartSpec) -> dict[str, np.ndarray]:
    ids, texts, labels = [], [], []
    for rel in spec.files:
        raw = storage.read_bytes(storage.join(spec.location, rel))
        text = read_article(raw, rel)
        if not text:
            continue
        stem = rel[: -len(".txt")]
        if spec.source == "bbc":
            folder, _, file = stem.rpartition("/")
            topic = topic_of_folder(folder)
            ids.append(f"{topic}/{file}")
            labels.append(topic)
        else:
            ids.append(stem)
        texts.append(text)
    out = {"doc_id": np.array(ids, dtype=object), "text": np.array(texts, dtype=object)}
    if spec.source == "bbc":
        out["label"] = np.array(labels, dtype=object)
    return out


def _doc_id(value: Any, id_column: str | None, name: str, row: int) -> str:
    if id_column is None:
        return f"{name}:{row}"
    if value is None:
        raise DataError(f"{name} row {row}: id column {id_column!r} is null; every row needs an id")
    return str(value)


def _checked(rows, spec: PartSpec, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Check each row, skipping (and counting) empty or null texts."""
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    empty = 0
    for where, doc_id, text in rows:
        if text is None:
            empty += 1
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{where}: text column {cfg.text_column!r} holds a {type(text).__name__} ({str(text)[:60]!r}), "
                "expected a string; set data.text_column to the column with the text"
            )
        if not text.strip():
            empty += 1
            continue
        if doc_id in seen:
            raise duplicate_id_error(doc_id, cfg, where)
        seen.add(doc_id)
        ids.append(doc_id)
        texts.append(text)
    if empty:
        logger.warning("skipped %d of %d rows of %s with empty or null %r", empty, empty + len(ids), spec.part_id, cfg.text_column)
    return {"doc_id": np.array(ids, dtype=object), "text": np.array(texts, dtype=object)}


def duplicate_id_error(doc_id: str, cfg: DataConfig, where: str) -> DataError:
    fix = (f"make column {cfg.id_column!r} unique across all files, or unset data.id_column to number rows per file"
           if cfg.id_column else "two files share a path: rename one, or set data.id_column to a unique column")
    return DataError(f"{where}: document id {doc_id!r} appears twice; ids must be unique ({fix})")


def iter_documents(cfg: DataConfig, parts: list[PartSpec] | None = None) -> Iterator[Document]:
    """Every document of the source, part by part (the driver holds one part at a time).

    For recipes and tests that need documents in the driver; the labeling path reads parts in
    its actors instead.
    """
    for spec in parts if parts is not None else plan_parts(cfg):
        rows = read_part(spec, cfg)
        labels = rows.get("label", [None] * len(rows["doc_id"]))
        for doc_id, text, label in zip(rows["doc_id"], rows["text"], labels):
            yield Document(doc_id=str(doc_id), text=str(text), label=label)


def load_documents(cfg: DataConfig) -> list[Document]:
    """Every document of the source as a list in the driver (small corpora, tests and recipes
    that need a list; the labeling path streams parts instead).

    Returns:
        Documents in source order (files in sorted name order, rows in file order).

    Raises:
        FileNotFoundError, ValueError: as :func:`plan_parts` and :func:`read_part`; also an id
            that repeats across files, and a source where every text is empty.
    """
    docs, seen = [], set()
    for doc in iter_documents(cfg):
        if doc.doc_id in seen:
            raise duplicate_id_error(doc.doc_id, cfg, f"data.path={cfg.path!r}")
        seen.add(doc.doc_id)
        docs.append(doc)
    if not docs:
        raise ValueError(f"data.path={cfg.path!r} holds no text: every {cfg.text_column!r} is empty or null, or there "
                         "are no rows; point data.path at data with text, or set data.text_column to the column that holds it")
    return docs
