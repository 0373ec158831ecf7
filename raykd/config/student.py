"""How the student is built (``student:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raykd.config.base import Strict, VocabMapping


class StudentConfig(Strict):
    """How the student is built."""

    init: Literal["layer_drop", "pretrained"] = "layer_drop"
    """``layer_drop``: copy the teacher and keep ``keep_layers`` (DistilBERT/MiniDisc style);
    ``pretrained``: load ``model`` as is."""
    model: str | None = None
    """Student model for ``pretrained`` (same forms as ``teacher.model``); layer_drop copies
    the teacher when None."""
    keep_layers: list[int] = Field(default_factory=lambda: [0, 6, 12, 18, 24, 29])
    """Teacher layer indices kept by ``layer_drop`` (negative counts from the end)."""
    tokenizer_alignment: Literal["byte_offsets"] | None = None
    """How a student whose tokenizer differs from the teacher's (``student.model`` with another
    tokenizer) is taught. None (the default) refuses such a student before any work. ``byte_offsets``:
    the cache stays the teacher's; each worker re-tokenises the blocks' text for the student and
    aligns positions where both tokens end at the same byte offset (TRL's GOLD rule); the teacher's
    top-k ids map to the student ids of the same bytes, the others join the tail bucket. Train with
    ``uld`` (ULD, Boizard et al. 2024: sorted probabilities, no id mapping) and/or ``forward_kl``
    (exact KL over the matched tokens); see :mod:`raykd.train.cross_tokenizer`."""
    init_from: str | None = None
    """A staged start (GKD's, e.g. RAIL-KD from a DistilBERT-distilled student): start from another
    run's trained student folder (``<run>/students/<name>``) instead of building one. Its
    ``layer_origin.json`` (written for a student layer-dropped from the teacher, and kept by the
    export) gives the feature terms' default layer map; ``init``, ``model`` and ``keep_layers``
    are then not used and must be left unset."""
    vocab_size: int | float | None = None
    """GLMD vocabulary compression: give the student an embedding and LM head over N entries, N
    this count (at least 8) or this fraction in (0, 1) of the teacher vocabulary (rounded down,
    as the seed's ``map_vocab_size``); None keeps the teacher's full vocabulary. ``vocab_map``
    says which ids keep an entry. See :mod:`raykd.students.vocab`."""
    vocab_map: VocabMapping = "bucket"
    """How ``vocab_size`` maps the teacher's ids onto N entries, ranked by train-split frequency.
    ``bucket``: the N - 1 most frequent ids keep an entry, every other id shares one OTHER entry
    (its row the frequency-weighted mean of theirs). ``decoder`` / ``cosine`` / ``euclidean``
    (GLMD's seed): the N most frequent ids keep an entry and every other id is read as the kept id
    whose teacher input embedding has the largest dot product / cosine / smallest Euclidean
    distance with its own."""

    @field_validator("vocab_size")
    @classmethod
    def _count_or_fraction(cls, v: float | None) -> int | float | None:
        if isinstance(v, float) and not 0 < v < 1 or isinstance(v, int) and v < 8:
            raise ValueError(f"student.vocab_size={v} must be a count of at least 8 or a fraction in (0, 1) "
                             "of the teacher vocabulary")
        return v

    @model_validator(mode="after")
    def _init_from_alone(self) -> StudentConfig:
        if self.init_from is not None and (both := sorted({"init", "model", "keep_layers"} & self.model_fields_set)):
            raise ValueError(f"student.init_from starts from a trained student folder: leave {both} unset")
        return self

    @field_validator("keep_layers")
    @classmethod
    def _non_empty_unique(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("student.keep_layers must name at least one layer")
        if len(set(v)) != len(v):
            raise ValueError(f"student.keep_layers has duplicates: {v}")
        return v
