"""The registry of distillation methods: named compositions of loss terms, schedules, teachers
and recipes.

A *loss* (:mod:`raykd.losses`) is one term; a *method* says how a whole run is put together:
which terms (``train.students``), which schedule (``train.phases``), how many teachers and how
they are combined (``extra_teachers`` + :attr:`Method.combine`), which student (``student``),
which data (``data.perturb_share``), and which recipe function runs it. A config names its
method (``method: annealing_kd``) and spells out every setting itself (a config is a complete
``DistillConfig``; nothing is filled in behind the user's back); the method then *checks* that
the config composes what the method means, before any teacher call or training step.

Add a method with :func:`register_method`::

    register_method(Method(
        name="my_kd", description="one line for `raykd methods`", paper="Author et al. 2024, ...",
        composes="what the config must hold", uses=frozenset({"phases"}),
        recipe="raykd.recipes.lm.distill:run_distill"))

Pure Python: importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DistillConfig = Any
"""A :class:`raykd.config.DistillConfig` (not imported: the config imports this registry to check
a config's method, so this module stays below it)."""

FEATURES = ("phases", "teachers", "vocab", "perturb", "generate", "chain", "agnostic_stage", "on_policy",
            "cross_tokenizer", "features")
"""Parts of a config beyond a plain single-teacher run; a method must declare the ones it uses.

- ``phases``: ``train.phases`` is not empty (a schedule of objective and temperature);
- ``teachers``: ``extra_teachers`` is not empty (several teachers joined by row);
- ``vocab``: ``student.vocab_size`` is set (vocabulary compression, mapped as ``student.vocab_map``);
- ``perturb``: ``data.perturb_share > 0`` (teacher labels on perturbed text);
- ``generate``: ``generation`` is set (teacher generations as training text);
- ``chain``: ``chain`` is set (teacher assistants between teacher and student);
- ``agnostic_stage``: ``agnostic_stage`` is set (a task-agnostic stage before the task stage);
- ``on_policy``: ``on_policy`` is set (the student's own samples scored by the served teacher);
- ``cross_tokenizer``: ``student.tokenizer_alignment`` is set (a student with another tokenizer).
- ``features``: an objective has a feature (intermediate-layer) term, read from the teacher run
  in each Train worker through ``train.layer_map`` (default: the stride of ``student.keep_layers``).
"""

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped config of every method (package data: present in a non-editable install too)."""


class UnknownMethodError(KeyError):
    """A method name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Method:
    """A registered distillation method.

    Attributes:
        name: registry name, the ``method`` field of a config.
        description: one line shown by ``raykd methods``.
        paper: the paper (or source) the method follows.
        composes: how the method composes loss terms, schedules, teachers and recipes (shown
            by ``raykd methods --verbose``).
        uses: config features (:data:`FEATURES`) the method may use.
        requires: features the method must use (a subset of ``uses``).
        combine: how several teachers' soft labels become one target (a name in
            :mod:`raykd.losses.multi_teacher`), for methods that use ``teachers``.
        recipe: ``"module:function"`` that runs a config of this method; called as
            ``fn(cfg, output_dir)``. Resolved lazily, so the registry imports nothing heavy.
        check: optional extra check ``fn(cfg) -> None`` raising ``ValueError``.
    """

    name: str
    description: str
    paper: str
    composes: str
    uses: frozenset[str] = frozenset()
    requires: frozenset[str] = frozenset()
    combine: str | None = None
    recipe: str = "raykd.recipes.lm.distill:run_distill"
    check_fn: Callable[[DistillConfig], None] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        """The method's config under ``raykd/methods/configs/``."""
        return CONFIG_DIR / f"{self.name}.yaml"

    def check(self, cfg: DistillConfig) -> None:
        """Check that ``cfg`` composes this method (cheap; runs when the config is validated).

        Raises:
            ValueError: the config uses a feature the method does not, misses one it requires,
                or fails the method's own check; the message says which and how to fix it.
        """
        used = config_features(cfg)
        if extra := sorted(used - self.uses):
            raise ValueError(f"method {self.name!r} does not use {extra} (set by the config); "
                             f"pick a method that does (`raykd methods`) or remove them")
        if missing := sorted(self.requires - used):
            raise ValueError(f"method {self.name!r} needs {missing} in the config: {self.composes}")
        if self.check_fn is not None:
            self.check_fn(cfg)

    def run(self, cfg: DistillConfig, output_dir: Path) -> Any:
        """Run ``cfg`` with this method's recipe function."""
        module, _, fn = self.recipe.partition(":")
        return getattr(importlib.import_module(module), fn)(cfg, Path(output_dir))


def config_features(cfg: DistillConfig) -> set[str]:
    """The :data:`FEATURES` a config uses."""
    flags = {
        "phases": bool(cfg.train.phases),
        "teachers": bool(cfg.extra_teachers),
        "vocab": cfg.student.vocab_size is not None,
        "perturb": cfg.data.perturb_share > 0,
        "generate": cfg.generation is not None,
        "chain": cfg.chain is not None,
        "agnostic_stage": cfg.agnostic_stage is not None,
        "on_policy": getattr(cfg, "on_policy", None) is not None,
        "cross_tokenizer": getattr(cfg.student, "tokenizer_alignment", None) is not None,
        "features": bool(cfg.train.feature_terms()),
    }
    return {name for name, on in flags.items() if on}


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry and return it.

    Raises:
        ValueError: the name is taken, or ``uses`` / ``requires`` name unknown features.
    """
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    if bad := sorted((method.uses | method.requires) - set(FEATURES)):
        raise ValueError(f"method {method.name!r}: unknown features {bad}; known: {list(FEATURES)}")
    if not method.requires <= method.uses:
        raise ValueError(f"method {method.name!r}: requires {sorted(method.requires)} must be a subset of uses")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        KeyError: (an :class:`UnknownMethodError`) the name is unknown; the message lists the
            valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> dict[str, Method]:
    """All registered methods by name, in registration order (a copy)."""
    return dict(_REGISTRY)


def run_method(cfg: DistillConfig, output_dir: Path) -> Any:
    """Run a config with the recipe of its method (what ``raykd distill`` does)."""
    return get_method(cfg.method).run(cfg, output_dir)


# ---- the checks a few methods add beyond their features ---------------------------------------


def _objectives(cfg: DistillConfig) -> list[dict[str, float]]:
    out = list(cfg.train.students.values())
    for p in cfg.train.phases:
        out += [w for w in (p.weights, p.weights_end) if w is not None]
    return out


def _teacher_terms(weights: dict[str, float]) -> list[str]:
    # lazy: keeps torch out of import time
    from raykd.losses import get_loss

    return [n for n, w in weights.items() if w > 0 and get_loss(n).needs_teacher]


def _no_hard_labels(cfg: DistillConfig) -> None:
    if bad := [w for w in _objectives(cfg) if w.get("ce", 0) > 0]:
        raise ValueError(f"method {cfg.method!r} distils from logits only (no hard labels): "
                         f"remove the `ce` term (or give it weight 0) in {bad}")


def _pd(cfg: DistillConfig) -> None:
    first, rest = cfg.train.phases[0], cfg.train.phases[1:]
    if first.weights is None or _teacher_terms(first.weights) or first.weights_end is not None:
        raise ValueError("method 'pd' pre-trains first: train.phases[0].weights must use no teacher "
                         "term (e.g. {ce: 1.0}) and no weights_end")
    if not rest:
        raise ValueError("method 'pd' needs a second phase (the KD phase) after the pre-training phase")


def _annealing(cfg: DistillConfig) -> None:
    phases = cfg.train.phases
    first = phases[0]
    if len(phases) != 2 or first.temperature is None or first.temperature_end is None \
            or first.temperature <= first.temperature_end:
        raise ValueError("method 'annealing_kd' needs two phases: phase 1 anneals the temperature down "
                         "(temperature > temperature_end), phase 2 trains on hard labels")
    last = phases[-1].weights
    if last is None or _teacher_terms(last) or last.get("ce", 0) <= 0:
        raise ValueError("method 'annealing_kd': the last phase trains on hard labels only, e.g. weights: {ce: 1.0}")


def _continuation(cfg: DistillConfig) -> None:
    p = cfg.train.phases[0]
    if len(cfg.train.phases) != 1 or p.temperature_end is None or p.weights_end is None \
            or p.temperature <= p.temperature_end:
        raise ValueError("method 'continuation_kd' needs one phase that anneals the temperature down "
                         "(temperature > temperature_end) while the weights move (weights -> weights_end)")


def _glmd_vocab(cfg: DistillConfig) -> None:
    _no_hard_labels(cfg)
    if cfg.student.init != "layer_drop":
        raise ValueError("method 'glmd_vocab' compresses a layer-dropped student: set student.init=layer_drop")


# ---- the logit-level methods -------------------------------------------------------------------

register_method(Method(
    name="kd",
    description="soft + hard labels: weighted registry losses, constant temperature",
    paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network",
    composes="train.students {forward_kl: w, ce: 1 - w} (any registry losses); no schedule, one teacher",
))
register_method(Method(
    name="pd",
    description="pre-train the student on the text (LM loss), then KD",
    paper="Turc et al. 2019, Well-Read Students Learn Better (Pre-trained Distillation)",
    composes="train.phases: [{until: s, weights: {ce: 1}}, {until: 1.0}] (the second phase uses each "
             "student's own KD objective); one budget for both stages",
    uses=frozenset({"phases"}), requires=frozenset({"phases"}), check_fn=_pd,
))
register_method(Method(
    name="annealing_kd",
    description="stage 1: KD to a teacher whose temperature is annealed down to 1; stage 2: hard labels",
    paper="Jafari et al. 2021, Annealing Knowledge Distillation (EACL)",
    composes="train.phases: [{weights: {forward_kl: 1}, temperature: tau_max, temperature_end: 1}, "
             "{weights: {ce: 1}}]; sparse soft labels are re-tempered over the K + 1 buckets",
    uses=frozenset({"phases"}), requires=frozenset({"phases"}), check_fn=_annealing,
))
register_method(Method(
    name="continuation_kd",
    description="one stage from a smoothed objective (high temperature, KD only) to the full one (KD + CE)",
    paper="Jafari et al. 2022, Continuation KD: Improved Knowledge Distillation through the Lens of "
          "Continuation Optimization (EMNLP Findings)",
    composes="train.phases: [{weights: {forward_kl: 1, ce: 0}, weights_end: {forward_kl: a, ce: b}, "
             "temperature: tau_max, temperature_end: 1}]",
    uses=frozenset({"phases"}), requires=frozenset({"phases"}), check_fn=_continuation,
))
register_method(Method(
    name="glmd",
    description="logits only (no hard labels, no intermediate layers); a task-agnostic stage at temperature 15, "
                "then the task stage at 1",
    paper="Tan et al. 2023, Are Intermediate Layers and Labels Really Necessary? A General Language "
          "Model Distillation Method (GLMD, Findings of ACL)",
    composes="train.students with teacher terms only (no ce), one teacher; agnostic_stage: {steps, temperature: 15, "
             "teacher: online} runs first (dense online teacher) and the task stage starts from its student; "
             "without agnostic_stage, the task stage alone",
    uses=frozenset({"agnostic_stage", "phases"}), recipe="raykd.recipes.lm.glmd:run_glmd", check_fn=_no_hard_labels,
))
register_method(Method(
    name="glmd_vocab",
    description="GLMD with vocabulary compression: a smaller student embedding/LM head over a mapped vocabulary",
    paper="Tan et al. 2023 (GLMD), vocabulary compression (the seed's build_map_vocab_for_student)",
    composes="as glmd, plus student.vocab_size: N (a count or a fraction of V) and student.vocab_map: "
             "decoder (the N most frequent train ids kept, every other id read as the kept id whose teacher "
             "embedding has the largest dot product with its own; cosine and euclidean also), or bucket "
             "(N - 1 kept + one OTHER entry); soft labels are mapped into the compressed vocabulary "
             "(merged ids sum their mass, where the seed renormalises over the kept ids)",
    uses=frozenset({"vocab"}), requires=frozenset({"vocab"}), check_fn=_glmd_vocab,
))
register_method(Method(
    name="robust_kd",
    description="distil on perturbed inputs: a share of tokens replaced, the teacher labels the perturbed text",
    paper="GKD (Tan et al. 2023, GKD: A General Knowledge Distillation Framework for Large-scale "
          "Pre-trained Language Model), distill_random_data",
    composes="data.perturb_share > 0 (train split only); teacher terms (hard labels of perturbed text are noise)",
    uses=frozenset({"perturb"}), requires=frozenset({"perturb"}), check_fn=_no_hard_labels,
))


def _multi_teacher(name: str, description: str, paper: str, combine: str, weights: str) -> Method:
    teachers = frozenset({"teachers"})
    return register_method(Method(
        name=name, description=description, paper=paper, uses=teachers, requires=teachers, combine=combine,
        composes=f"extra_teachers: [...] (each labels the same blocks into its own cache, joined by row); {weights}",
    ))


_multi_teacher("tmkd", "several teachers, their soft labels averaged",
               "Yang et al. 2020, Model Compression with Two-stage Multi-teacher Knowledge Distillation for Web "
               "Question Answering System (TMKD, WSDM)", "mean", "targets = mean of the teachers' distributions")
_multi_teacher("mt_bert", "several teachers weighted per example by how well each predicts the real text",
               "Wu et al. 2021, One Teacher is Enough? Pre-trained Language Model Distillation from Multiple Teachers "
               "(MT-BERT, Findings of ACL)", "truth",
               "weights = softmax over teachers of each one's mean log-likelihood of the example's real next tokens "
               "/ multi_teacher.weight_temperature")
_multi_teacher("uncertainty", "several teachers weighted per token by their confidence (low entropy, more weight)",
               "Li et al. 2021, Dynamic Knowledge Distillation for Pre-trained Language Models (uncertainty-based "
               "weighting; here the teachers' entropy, as GKD's Uncertainty method)", "entropy",
               "weights = softmax over teachers of -entropy / multi_teacher.weight_temperature")
_multi_teacher("rl_kd", "a policy picks one teacher per example, rewarded by the student's loss drop",
               "Yuan et al. 2021, Reinforced Multi-Teacher Selection for Knowledge Distillation (AAAI)", "policy",
               "a linear softmax policy over per-teacher features (entropy, likelihood of the text) samples one "
               "teacher per example; REINFORCE, reward = drop of the student's per-example CE over the step")


# ---- methods that chain runs or change the training text (recipes of their own) --------------


def _chain(cfg: DistillConfig) -> None:
    n_student = len(cfg.student.keep_layers)
    sizes = [len(a.keep_layers) for a in cfg.chain.assistants]
    if any(s <= n_student for s in sizes) or sizes != sorted(sizes, reverse=True):
        raise ValueError(f"method {cfg.method!r}: each teacher assistant must keep more layers than the student "
                         f"({n_student}) and fewer than the one before it; chain.assistants keep {sizes}")


register_method(Method(
    name="seqkd",
    description="sequence-level KD: the student trains on the teacher's own continuations of the training text",
    paper="Kim & Rush 2016, Sequence-Level Knowledge Distillation (EMNLP)",
    composes="generation: {prompt_tokens, max_new_tokens, temperature: 0 (greedy)}; the prompt + continuation "
             "replaces each training document; train.students {ce: 1} (Seq-KD) or with forward_kl (Seq-KD + Word-KD)",
    uses=frozenset({"generate"}), requires=frozenset({"generate"}), recipe="raykd.recipes.lm.seqkd:run_seqkd",
))
register_method(Method(
    name="takd",
    description="teacher -> teacher assistant(s) -> student; each trained TA is served as the next teacher",
    paper="Mirzadeh et al. 2020, Improved Knowledge Distillation via Teacher Assistant (AAAI)",
    composes="chain.assistants: [{keep_layers: [...]}, ...] (largest first); each stage a main-job run whose "
             "exported student is served as the next stage's teacher",
    uses=frozenset({"chain"}), requires=frozenset({"chain"}), recipe="raykd.recipes.lm.chains:run_takd", check_fn=_chain,
))
register_method(Method(
    name="dgkd",
    description="densely guided KD: the teacher and every earlier TA teach each later model (soft labels averaged)",
    paper="Son et al. 2021, Densely Guided Knowledge Distillation using Multiple Teacher Assistants (ICCV)",
    composes="as takd; each stage's teachers are the teacher and all earlier TAs, joined by row and averaged "
             "(tmkd's mean); no random teacher dropping",
    uses=frozenset({"chain"}), requires=frozenset({"chain"}), combine="mean", recipe="raykd.recipes.lm.chains:run_takd",
    check_fn=_chain,
))


# ---- on-policy methods: the student's own samples, scored by the served teacher ----------------


def _on_policy_terms(loss: str, share: tuple[float, float] | None = None) -> Callable[[DistillConfig], None]:
    """The check of an on-policy method: teacher terms only (CE on the student's own samples would
    teach it its own samples), ``loss`` among them, and ``on_policy_share`` within ``share``."""

    def check(cfg: DistillConfig) -> None:
        _no_hard_labels(cfg)
        if missing := [w for w in _objectives(cfg) if w.get(loss, 0) <= 0]:
            raise ValueError(f"method {cfg.method!r} trains on {loss}: give it a weight > 0 in {missing}")
        if share is not None and not share[0] <= cfg.on_policy.on_policy_share <= share[1]:
            raise ValueError(f"method {cfg.method!r} needs on_policy.on_policy_share in [{share[0]:g}, {share[1]:g}], "
                             f"got {cfg.on_policy.on_policy_share:g}")

    return check


def _minillm(cfg: DistillConfig) -> None:
    _on_policy_terms("reverse_kl", share=(1.0, 1.0))(cfg)
    if cfg.on_policy.stop_at_eos:
        raise ValueError("method 'minillm' normalises each sample by its length through equal lengths: set "
                         "on_policy.stop_at_eos=false (every sample then has max_new_tokens tokens)")


_ON_POLICY = frozenset({"on_policy"})

register_method(Method(
    name="gkd",
    description="generalized KD: a share of the steps on the student's own samples, scored by the served teacher; "
                "generalized JSD(beta)",
    paper="Agarwal et al. 2024, On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes "
          "(GKD, ICLR)",
    composes="on_policy: {on_policy_share: lambda, temperature: student sampling temperature, prompt_tokens, "
             "max_new_tokens}; train.students {generalized_jsd: 1}; train.loss_params {generalized_jsd: {beta}}; "
             "off-policy steps read the cache (real text labeled by the teacher)",
    uses=_ON_POLICY, requires=_ON_POLICY, check_fn=_on_policy_terms("generalized_jsd"),
))
register_method(Method(
    name="distillm",
    description="skew KL on a mix of cached text and student samples, the samples kept in a replay buffer and reused",
    paper="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models (ICML)",
    composes="train.students {skew_kl: 1} (train.loss_params {skew_kl: {alpha: 0.1}}); on_policy: {on_policy_share, "
             "replay_size, replay_share}. Simplified: a fixed on_policy_share instead of the adaptive scheduler that "
             "raises it when the validation loss rises; an on-policy step reuses buffered samples with probability "
             "replay_share, else samples afresh and adds to the buffer (oldest dropped)",
    uses=_ON_POLICY, requires=_ON_POLICY, check_fn=_on_policy_terms("skew_kl"),
))
register_method(Method(
    name="minillm",
    description="reverse KL on the student's own samples only (MiniLLM's length-normalised single-step term)",
    paper="Gu et al. 2023, MiniLLM: Knowledge Distillation of Large Language Models (ICLR 2024)",
    composes="on_policy: {on_policy_share: 1, stop_at_eos: false}; train.students {reverse_kl: 1}: the per-token "
             "reverse KL over the teacher's top-k + tail buckets on every sampled position; all samples have "
             "max_new_tokens tokens, so the token mean is the mean of each sample's length-normalised sum. Left "
             "out: the long-term policy-gradient term, teacher-mixed sampling and the pre-training loss",
    uses=_ON_POLICY, requires=_ON_POLICY, check_fn=_minillm,
))


# ---- across tokenizers: the teacher's cache read by a student with another tokenizer ----------

_CROSS = frozenset({"cross_tokenizer"})

register_method(Method(
    name="uld",
    description="a teacher with another tokenizer: sorted-probability L1 (ULD) at byte-aligned positions, "
                "exact KL on the tokens both vocabularies share",
    paper="Boizard et al. 2024, Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for "
          "LLMs (arXiv:2402.12030); alignment and matched-vocabulary term as TRL's GOLD trainer",
    composes="student.model (its own tokenizer) and student.tokenizer_alignment: byte_offsets; train.students "
             "{uld: a, forward_kl: b, ce: c} (forward_kl is over the matched tokens + one bucket for the rest)",
    uses=_CROSS, requires=_CROSS,
))


# ---- intermediate-layer (feature) methods on the decoder student: the teacher online in the worker ----


def _feature_method(term: str, kd: bool = True) -> Callable[[DistillConfig], None]:
    """The check of a feature method: every student trains on ``term`` (weight > 0) and, with
    ``kd``, on the teacher's soft labels too (``forward_kl``)."""

    def check(cfg: DistillConfig) -> None:
        need = [term, "forward_kl"] if kd else [term]
        if bad := {n: w for n, w in cfg.train.students.items() if any(w.get(t, 0) <= 0 for t in need)}:
            raise ValueError(f"method {cfg.method!r} trains every student on {need} (weights > 0); got {bad}")

    return check


_FEATURE_USES = frozenset({"features", "phases"})
_FEATURE_REQUIRES = frozenset({"features"})


def _feature_method_entry(*, term: str, **fields: str) -> Method:
    """A feature method: ``term`` and KD on the decoder student, through the feature terms of the
    Train loop (:func:`_feature_method` is its check)."""
    return Method(**fields, uses=_FEATURE_USES, requires=_FEATURE_REQUIRES, check_fn=_feature_method(term))


_LAYERS = ("train.layer_map (default: student layer i <-> teacher layer student.keep_layers[i]); the teacher's "
           "features from train.feature_teacher (auto: the measured faster of the keyed feature cache and the teacher "
           "run in each Train worker), its soft labels from the soft-label cache")

register_method(_feature_method_entry(
    name="distilbert_kd",
    description="KD + CE + cosine between the last mapped hidden states (on the decoder student)",
    paper="Sanh et al. 2019, DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter",
    composes=f"train.students {{forward_kl: a, ce: b, distilbert_cos: c}}; {_LAYERS}. The paper's student is "
             "initialised from every other teacher layer, as layer_drop does",
    term="distilbert_cos",
))
register_method(_feature_method_entry(
    name="patient_kd",
    description="KD + CE + MSE of L2-normalised hidden states at the mapped layers (PKD-Skip on a decoder: every token)",
    paper="Sun et al. 2019, Patient Knowledge Distillation for BERT Model Compression (EMNLP)",
    composes=f"train.students {{forward_kl: a, ce: b, pkd: beta}}, train.loss_params {{pkd: {{first_token_only: 0}}}} "
             f"(a decoder has no [CLS]: every token); {_LAYERS}",
    term="pkd",
))
register_method(_feature_method_entry(
    name="tinybert_kd",
    description="KD + CE + MSE of embeddings, hidden states and attention scores at the mapped layers",
    paper="Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding (Findings of EMNLP)",
    composes=f"train.students {{forward_kl: a, ce: b, tinybert: c}}; {_LAYERS}; as many student heads as teacher "
             "heads (layer_drop keeps them). One stage: the paper's general-then-task schedule and data augmentation "
             "are not here",
    term="tinybert",
))
register_method(_feature_method_entry(
    name="minilmv2_kd",
    description="KD + CE + KL of Q-Q, K-K, V-V self-relations of the last student layer (relation heads)",
    paper="Wang et al. 2021, MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained "
          "Transformers (Findings of ACL)",
    composes=f"train.students {{forward_kl: a, ce: b, minilmv2: c}}, train.loss_params {{minilmv2: {{relation_heads: "
             f"r}}}} (r divides the query and the key/value widths of both models); {_LAYERS}",
    term="minilmv2",
))


register_method(_feature_method_entry(
    name="universal_kd",
    description="KD + CE + KL between each mapped student layer and an attention mix of all teacher layers",
    paper="Wu et al. 2021, Universal-KD: Attention-based Output-Grounded Intermediate Layer Knowledge Distillation "
          "(EMNLP); the maps into a common hidden-size space as GKD's seed (not the paper's output space)",
    composes=f"train.students {{forward_kl: a, ce: b, universal_kd: c}}, train.loss_params {{universal_kd: "
             f"{{first_token_only: 0, size: d}}}} (pooled over real tokens; the per-layer maps train with the student "
             f"and are dropped at export); {_LAYERS}",
    term="universal_kd",
))
register_method(_feature_method_entry(
    name="sid",
    description="stacked internal distillation: attention KL + pooled-state cosine, layers unlocked stage by stage, "
                "then KD + CE",
    paper="Aguilar et al. 2020, Knowledge Distillation from Internal Representations (AAAI); stages as GKD's seed "
          "(sid_lim_e=avg: max_steps / (L + 1) steps each)",
    composes=f"train.students {{forward_kl: a, ce: b, sid: c}}, train.loss_params {{sid: {{first_token_only: 0, "
             f"threshold: t}}}}; the stage schedule (StackedSchedule) gates the logit terms off until every mapped "
             f"layer is unlocked and keeps the stage in the train state; equal widths and head counts; {_LAYERS}",
    term="sid",
))
register_method(_feature_method_entry(
    name="diito",
    description="KD + CE + KD between interchange-intervened forwards of student and teacher at an aligned layer",
    paper="Wu et al. 2022, Causal Distillation for Language Models (NAACL), weights as GKD's seed (0.25 each)",
    composes=f"train.students {{forward_kl: a, ce: b, diito: c}}, train.loss_params {{diito: {{interchange_prop: "
             f"0.3, cos_weight: 1}}}}; the teacher online in the Train worker (train.feature_teacher: online: the "
             f"intervened teacher forward has no cached form); {_LAYERS}",
    term="diito",
))


register_method(_feature_method_entry(
    name="minilm_kd",
    description="KD + CE + KL of the last mapped layer's self-attention distributions and value relations",
    paper="Wang et al. 2020, MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained "
          "Transformers (NeurIPS)",
    composes=f"train.students {{forward_kl: a, ce: b, minilm: c}}; {_LAYERS}; as many student heads as teacher heads "
             "(layer_drop keeps them). The paper distils task-agnostically on a pre-training corpus; here on the job's text",
    term="minilm",
))
register_method(_feature_method_entry(
    name="alp_kd",
    description="KD + CE + MSE between each mapped student layer and an attention mix of all teacher layers",
    paper="Passban et al. 2021, ALP-KD: Attention-Based Layer Projection for Knowledge Distillation (AAAI)",
    composes=f"train.students {{forward_kl: a, ce: b, alp_kd: c}}, train.loss_params {{alp_kd: {{first_token_only: 0}}}} "
             f"(every token: a decoder has no [CLS]); {_LAYERS} (only its student side: every teacher layer takes part)",
    term="alp_kd",
))
register_method(_feature_method_entry(
    name="ckd",
    description="KD + CE + Huber loss of word relations and layer-transforming relations at the mapped layers",
    paper="Park et al. 2021, Distilling Linguistic Context for Language Model Compression (EMNLP); pair-wise "
          "relations only (the paper's triple-wise angles left out)",
    composes=f"train.students {{forward_kl: a, ce: b, ckd: c}}, train.loss_params {{ckd: {{word_weight: w, "
             f"layer_weight: l}}}}; {_LAYERS}",
    term="ckd",
))
register_method(_feature_method_entry(
    name="mgskd",
    description="KD + CE + Huber loss of token, span and sample relations at the mapped layers",
    paper="Liu et al. 2022, Multi-Granularity Structural Knowledge Distillation for Language Model Compression (ACL); "
          "spans are fixed windows, not the paper's phrases; no angles",
    composes=f"train.students {{forward_kl: a, ce: b, mgskd: c}}, train.loss_params {{mgskd: {{span: s}}}}; {_LAYERS}",
    term="mgskd",
))
register_method(_feature_method_entry(
    name="lrc_bert",
    description="KD + CE + contrastive loss of the mapped layers' pooled states (in-batch negatives)",
    paper="Fu et al. 2021, LRC-BERT: Latent-representation Contrastive Knowledge Distillation for Natural Language "
          "Understanding (AAAI); InfoNCE over cosines, not the paper's COS-NCE margin form",
    composes=f"train.students {{forward_kl: a, ce: b, lrc_bert: c}}, train.loss_params {{lrc_bert: {{tau: t}}}} "
             f"(negatives: the other rows of a micro-batch); {_LAYERS}",
    term="lrc_bert",
))


def _mixbaseline(cfg: DistillConfig) -> None:
    # lazy: keeps torch out of import time
    from raykd.losses import get_loss

    for name, weights in cfg.train.students.items():
        feature = [n for n, w in weights.items() if w > 0 and get_loss(n).kind == "features"]
        if len(feature) < 2 or weights.get("forward_kl", 0) <= 0:
            raise ValueError(f"method 'mixbaseline' sums the intermediate terms of several baselines with KD: student "
                             f"{name!r} needs forward_kl and at least two feature terms with weights > 0, got {weights}")


register_method(Method(
    name="mixbaseline",
    description="several baselines at once: KD + a weighted sum of their intermediate-layer terms",
    paper="GKD (Tan et al. 2023, GKD: A General Knowledge Distillation Framework for Large-scale Pre-trained Language "
          "Model), mixbaseline (--mixbaseline_inter_bl TinyBERT,MiniLMv2,MiniLM,DistilBERT)",
    composes=f"train.students {{forward_kl: a, tinybert: b, minilmv2: c, distilbert_cos: d, ...}} (any registered "
             f"feature terms, each with its own weight and train.loss_params); {_LAYERS}. Left out: GKD's per-baseline "
             "temperatures (one temperature for the logit term) and its option to drop the intermediate terms for a "
             "second fine-tuning (a second run with train.students {forward_kl: 1} does that)",
    uses=_FEATURE_USES, requires=_FEATURE_REQUIRES, check_fn=_mixbaseline,
))

