"""Text data for raykd: documents from BBC News, JSONL, Parquet or ``datasets``; a seeded split by
document; tokenisation into fixed-length blocks. Pure Python, numpy and pyarrow (no Ray)."""

from raykd.data.bbc import BBC_TOPICS, bbc_news_folder, load_bbc_news
from raykd.data.blocks import IGNORE_INDEX, shift_labels, tokenize_to_blocks
from raykd.data.documents import Document
from raykd.data.sources import load_documents
from raykd.data.splits import split_documents

__all__ = [
    "BBC_TOPICS",
    "IGNORE_INDEX",
    "Document",
    "bbc_news_folder",
    "load_bbc_news",
    "load_documents",
    "shift_labels",
    "split_documents",
    "tokenize_to_blocks",
]
