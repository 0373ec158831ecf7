"""Load documents from the source a :class:`~raykd.config.DataConfig` names.

Sources: ``bbc`` (the installed BBC News corpus), ``jsonl`` and ``parquet`` (a file, a glob or a
folder of files) and ``hf`` (a folder written by ``datasets.save_to_disk``, or anything
``datasets.load_dataset`` accepts). Every check that can fail (path, columns) runs before rows
are read, and every error names the problem and the setting that fixes it.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raykd.data.bbc import load_bbc_news
from raykd.data.documents import Document

if TYPE_CHECKING:
    from raykd.config import DataConfig

logger = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")
_HF_SAVED_MARKERS = ("state.json", "dataset_dict.json")

# (row label for messages, document id, text value) for each row of a source.
_Row = tuple[str, str, Any]


def load_documents(cfg: DataConfig) -> list[Document]:
    """Read the documents of ``cfg.source``.

    Args:
        cfg: data settings; uses ``source``, ``path``, ``text_column``, ``id_column`` and
            ``hf_split``.

    Returns:
        Documents in source order (files in sorted name order, rows in file order). The id is
        the ``id_column`` value as a string, or ``"<file stem>:<row>"`` (row counted from 0).
        Rows with empty or null text are skipped and their number logged.

    Raises:
        FileNotFoundError: the path does not exist, a glob matches nothing or a folder holds no
            file of the source's type.
        ValueError: the text or id column is missing (the message lists the columns there
            are), a text value is not a string or an id is null (the message names the row),
            every text is empty or null, two rows share an id, or a JSONL line is not a JSON
            object.
    """
    if cfg.source == "bbc":
        return load_bbc_news()
    if cfg.path is None:
        raise ValueError(f"data.path is required for data.source={cfg.source!r}")
    if cfg.source == "jsonl":
        rows = _jsonl_rows(_resolve_files(cfg.path, ".jsonl", "jsonl"), cfg.text_column, cfg.id_column)
    elif cfg.source == "parquet":
        rows = _parquet_rows(_resolve_files(cfg.path, ".parquet", "parquet"), cfg.text_column, cfg.id_column)
    elif cfg.source == "hf":
        rows = _hf_rows(cfg.path, cfg.hf_split, cfg.text_column, cfg.id_column)
    else:
        raise ValueError(f"unknown data.source={cfg.source!r}; use one of bbc, jsonl, parquet, hf")
    return _to_documents(rows, where=cfg.path, text_column=cfg.text_column, id_column=cfg.id_column)


def _resolve_files(path: str, suffix: str, source: str) -> list[Path]:
    """A file, the sorted matches of a glob (``**`` recurses), or the ``*<suffix>`` files of a folder."""
    expanded = str(Path(path).expanduser())
    if _GLOB_CHARS & set(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data.path={path!r} matches no file; fix the pattern in data.path")
        return files
    p = Path(expanded)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob(f"*{suffix}") if f.is_file())
        if not files:
            raise FileNotFoundError(
                f"the folder data.path={path!r} holds no *{suffix} file; point data.path at a "
                f"{source} file, a glob such as '{path.rstrip('/')}/**/*{suffix}', or another folder"
            )
        return files
    raise FileNotFoundError(
        f"data.path={path!r} does not exist; set data.path to a {source} file, glob or folder"
    )


def _missing_column(column: str, setting: str, columns: Iterable[str], where: object) -> ValueError:
    names = ", ".join(repr(c) for c in columns) or "none"
    return ValueError(
        f"{where} has no column {column!r} (columns: {names}); set data.{setting}=<name> to one of them"
    )


def _jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number from 1, record) for each non-blank line of a JSONL file."""
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{line_no} is not valid JSON ({e.msg}); fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no} is a JSON {type(record).__name__}, expected an object")
            records.append((line_no, record))
    return records


def _jsonl_rows(files: list[Path], text_column: str, id_column: str | None) -> Iterator[_Row]:
    """Rows of JSONL files; a column absent from a record counts as null."""
    for path in files:
        records = _jsonl_records(path)
        for column, setting in ((text_column, "text_column"), (id_column, "id_column")):
            if column is not None and records and not any(column in r for _, r in records):
                keys = dict.fromkeys(k for _, r in records for k in r)
                raise _missing_column(column, setting, keys, path)
        for row, (line_no, record) in enumerate(records):
            yield (
                f"{path}:{line_no} (row {row})",
                _doc_id(record.get(id_column) if id_column else None, id_column, path.stem, row),
                record.get(text_column),
            )


def _parquet_rows(files: list[Path], text_column: str, id_column: str | None) -> Iterator[_Row]:
    """Rows of Parquet files; all schemas are checked before any data is read."""
    import pyarrow.parquet as pq

    columns = [text_column] + ([id_column] if id_column else [])
    for path in files:
        names = pq.read_schema(path).names
        for column, setting in ((text_column, "text_column"), (id_column, "id_column")):
            if column is not None and column not in names:
                raise _missing_column(column, setting, names, path)
    for path in files:
        table = pq.read_table(path, columns=columns)
        texts = table.column(text_column).to_pylist()
        ids = table.column(id_column).to_pylist() if id_column else [None] * len(texts)
        for row, (text, id_value) in enumerate(zip(texts, ids)):
            yield f"{path} row {row}", _doc_id(id_value, id_column, path.stem, row), text


def _load_hf(path: str, split: str) -> Any:
    """A ``datasets.Dataset``: ``load_from_disk`` for a saved folder, else ``load_dataset``."""
    import datasets

    folder = Path(path).expanduser()
    if folder.is_dir() and any((folder / m).is_file() for m in _HF_SAVED_MARKERS):
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(
                    f"the saved dataset {path!r} has no split {split!r} (splits: {', '.join(ds)}); "
                    "set data.hf_split=<split>"
                )
            ds = ds[split]
        return ds
    looks_local = path.startswith(("/", "./", "../", "~")) or folder.suffix in (".json", ".jsonl", ".parquet")
    if looks_local and not folder.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist; set data.path to a saved dataset folder")
    return datasets.load_dataset(path, split=split)


def _hf_rows(path: str, split: str, text_column: str, id_column: str | None) -> Iterator[_Row]:
    ds = _load_hf(path, split)
    for column, setting in ((text_column, "text_column"), (id_column, "id_column")):
        if column is not None and column not in ds.column_names:
            raise _missing_column(column, setting, ds.column_names, f"the dataset {path!r}")
    stem = Path(path.rstrip("/")).name
    texts = list(ds[text_column])
    ids = list(ds[id_column]) if id_column else [None] * len(texts)
    for row, (text, id_value) in enumerate(zip(texts, ids)):
        yield f"{path} row {row}", _doc_id(id_value, id_column, stem, row), text


def _doc_id(value: Any, id_column: str | None, stem: str, row: int) -> str:
    if id_column is None:
        return f"{stem}:{row}"
    if value is None:
        raise ValueError(f"{stem} row {row}: id column {id_column!r} is null; every row needs an id")
    return str(value)


def _to_documents(
    rows: Iterable[_Row], *, where: str, text_column: str, id_column: str | None
) -> list[Document]:
    """Check each row and build documents, skipping (and counting) empty or null texts."""
    docs: list[Document] = []
    seen: set[str] = set()
    empty = 0
    for row_name, doc_id, text in rows:
        if text is None:
            empty += 1
            continue
        if not isinstance(text, str):
            raise ValueError(
                f"{row_name}: text column {text_column!r} holds a {type(text).__name__} "
                f"({str(text)[:60]!r}), expected a string; set data.text_column to the column with the text"
            )
        if not text.strip():
            empty += 1
            continue
        if doc_id in seen:
            fix = (
                f"make column {id_column!r} unique, or unset data.id_column to number rows per file"
                if id_column
                else "two files share a name stem: rename one, or set data.id_column to a unique column"
            )
            raise ValueError(f"{row_name}: document id {doc_id!r} appears twice; ids must be unique ({fix})")
        seen.add(doc_id)
        docs.append(Document(doc_id=doc_id, text=text))
    if not docs:
        problem = f"all {empty} rows have an empty or null {text_column!r}" if empty else "holds no rows"
        raise ValueError(
            f"data.path={where!r} {problem}; point data.path at data with text, "
            "or set data.text_column to the column that holds it"
        )
    if empty:
        logger.warning(
            "skipped %d of %d rows of %s with empty or null %r", empty, empty + len(docs), where, text_column
        )
    return docs
