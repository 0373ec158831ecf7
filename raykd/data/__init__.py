"""Text data for raykd: documents streamed part by part from BBC News, JSONL, Parquet, text
folders or ``datasets``; splits by a seeded hash of the document id; tokenisation into
fixed-length blocks. Pure Python, numpy and pyarrow (Ray only to scan many files at once)."""

from raykd.data.bbc import BBC_TOPICS, bbc_news_folder, load_bbc_news
from raykd.data.blocks import IGNORE_INDEX, shift_labels, tokenize_to_blocks
from raykd.data.documents import Document
from raykd.data.sources import (
    PartSpec,
    iter_documents,
    load_documents,
    plan_parts,
    read_part,
)
from raykd.data.splits import hash_split, in_sample, select_split, split_documents

__all__ = [
    "BBC_TOPICS",
    "IGNORE_INDEX",
    "Document",
    "PartSpec",
    "bbc_news_folder",
    "hash_split",
    "in_sample",
    "iter_documents",
    "load_bbc_news",
    "load_documents",
    "plan_parts",
    "read_part",
    "select_split",
    "shift_labels",
    "split_documents",
    "tokenize_to_blocks",
]
