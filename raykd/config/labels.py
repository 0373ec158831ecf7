"""How soft labels are produced and cached (``labels:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raykd.config.base import Strict


class SoftLabelConfig(Strict):
    """How soft labels are produced and cached."""

    form: Literal["topk", "sampled"] = "topk"
    """What the cache keeps per position. ``topk``: the teacher's ``k`` most probable ids, their
    log-probs and the mass of the rest (a biased, truncated target). ``sampled``: ``samples`` ids
    drawn from the teacher's whole distribution, as distinct ids and counts, whose empirical
    distribution is an unbiased estimate of it (Anshumann et al., ACL 2025, "Sparse Logit
    Sampling"; :mod:`raykd.soft_labels.sampled`); only terms unbiased on it (``forward_kl``) may
    read it, and only the ``hf`` engine draws it."""
    k: int = Field(default=32, ge=1, le=4096)
    """Top-k logprobs kept per position ``K`` (``form=topk``)."""
    samples: int = Field(default=32, ge=1, le=4096)
    """Draws per position ``S`` (``form=sampled``), with replacement; the cache stores the
    distinct ids and their counts."""
    seed: int = Field(default=0, ge=0)
    """Seed of the draws (``form=sampled``): each block's draws follow from it, its document id and
    its block index, so a resumed or repeated labeling writes the same labels."""
    draws: Literal["independent", "systematic"] = "independent"
    """How the ``samples`` draws of a position are made (``form=sampled``). ``independent``: ``S``
    independent draws (multinomial counts, Anshumann et al. 2025). ``systematic``: one uniform and
    ``S`` evenly spaced points through the teacher's cumulative distribution (systematic
    resampling): every id's expected count is the same ``S p``, but each count is ``floor(S p)``
    or ``ceil(S p)``, the least variance of any unbiased scheme (every id with ``p >= 1/S`` is
    kept, so a position holds a few more distinct ids)."""
    temperature: float = Field(default=1.0, gt=0, le=100)
    """Teacher softmax temperature; the same value scales the student in the KD loss."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per teacher ``score`` call."""
    num_labelers: int = Field(default=2, ge=1)
    """Concurrent Ray Data labeling tasks, one part each (requests kept in flight at the teacher)."""
    cache_dir: str | None = None
    """Soft-label cache root (None: ``<user cache>/soft_labels``)."""
    rows_per_shard: int = Field(default=256, ge=1)
    """Rows per Parquet shard (at least; Ray Data may write fewer files)."""
    train_cache: str | None = None
    """Use this finished cache folder for the train split instead of looking it up by key. It is
    checked against the run's settings (schema version, teacher, tokenizer, k, temperature, data)
    and refused, naming the differing fields, before any compute starts."""
    fill: Literal["before", "live"] = "before"
    """When the parts of the train split missing from its cache (cache misses) are labeled:
    ``before`` training, as a stage of their own; or ``live``, during training: training starts
    on the committed parts at once while the served teacher labels the missing ones, and the
    student trains on each as it is committed (:mod:`raykd.soft_labels.live`). Either way the new
    labels are committed into the cache as parts, so the next run finds them."""

    @property
    def width(self) -> int:
        """Ids per position the teacher returns and the decoded cache holds: ``k``, or ``samples``."""
        return self.samples if self.form == "sampled" else self.k
