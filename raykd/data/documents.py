"""The unit of text that raykd reads, splits and tokenises."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    The train/test split works on whole documents, so every block cut from a document lands on
    the same side of the split.

    Attributes:
        doc_id: identifier, unique within a corpus (e.g. ``"business/001"`` or ``"part-0:17"``).
        text: the document's text, never empty.
        label: optional class label (the BBC topic), None where the source has none.
    """

    doc_id: str
    text: str
    label: str | None = None
