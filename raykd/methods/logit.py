"""Logit-level methods: soft and hard labels of one teacher, schedules of objective and temperature,
vocabulary compression and perturbed text."""

from __future__ import annotations

from raykd.methods.registry import DistillConfig, Method, no_hard_labels, teacher_terms


def _pd(cfg: DistillConfig) -> None:
    first, rest = cfg.train.phases[0], cfg.train.phases[1:]
    if first.weights is None or teacher_terms(first.weights) or first.weights_end is not None:
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
    if last is None or teacher_terms(last) or last.get("ce", 0) <= 0:
        raise ValueError("method 'annealing_kd': the last phase trains on hard labels only, e.g. weights: {ce: 1.0}")


def _continuation(cfg: DistillConfig) -> None:
    p = cfg.train.phases[0]
    if len(cfg.train.phases) != 1 or p.temperature_end is None or p.weights_end is None \
            or p.temperature <= p.temperature_end:
        raise ValueError("method 'continuation_kd' needs one phase that anneals the temperature down "
                         "(temperature > temperature_end) while the weights move (weights -> weights_end)")


def _glmd_vocab(cfg: DistillConfig) -> None:
    no_hard_labels(cfg)
    if cfg.student.init != "layer_drop":
        raise ValueError("method 'glmd_vocab' compresses a layer-dropped student: set student.init=layer_drop")


KD = Method(
    name="kd",
    description="soft + hard labels: weighted registry losses, constant temperature",
    paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network",
    composes="train.students {forward_kl: w, ce: 1 - w} (any registry losses); no schedule, one teacher",
)
PD = Method(
    name="pd",
    description="pre-train the student on the text (LM loss), then KD",
    paper="Turc et al. 2019, Well-Read Students Learn Better (Pre-trained Distillation)",
    composes="train.phases: [{until: s, weights: {ce: 1}}, {until: 1.0}] (the second phase uses each "
             "student's own KD objective); one budget for both stages",
    uses=frozenset({"phases"}), requires=frozenset({"phases"}), check_fn=_pd,
)
ANNEALING_KD = Method(
    name="annealing_kd",
    description="stage 1: KD to a teacher whose temperature is annealed down to 1; stage 2: hard labels",
    paper="Jafari et al. 2021, Annealing Knowledge Distillation (EACL)",
    composes="train.phases: [{weights: {forward_kl: 1}, temperature: tau_max, temperature_end: 1}, "
             "{weights: {ce: 1}}]; sparse soft labels are re-tempered over the K + 1 buckets",
    uses=frozenset({"phases"}), requires=frozenset({"phases"}), check_fn=_annealing,
)
CONTINUATION_KD = Method(
    name="continuation_kd",
    description="one stage from a smoothed objective (high temperature, KD only) to the full one (KD + CE)",
    paper="Jafari et al. 2022, Continuation KD: Improved Knowledge Distillation through the Lens of "
          "Continuation Optimization (EMNLP Findings)",
    composes="train.phases: [{weights: {forward_kl: 1, ce: 0}, weights_end: {forward_kl: a, ce: b}, "
             "temperature: tau_max, temperature_end: 1}]",
    uses=frozenset({"phases"}), requires=frozenset({"phases"}), check_fn=_continuation,
)
GLMD = Method(
    name="glmd",
    description="logits only (no hard labels, no intermediate layers); a task-agnostic stage at temperature 15, "
                "then the task stage at 1",
    paper="Tan et al. 2023, Are Intermediate Layers and Labels Really Necessary? A General Language "
          "Model Distillation Method (GLMD, Findings of ACL)",
    composes="train.students with teacher terms only (no ce), one teacher; agnostic_stage: {steps, temperature: 15, "
             "teacher: online} runs first (dense online teacher) and the task stage starts from its student; "
             "without agnostic_stage, the task stage alone",
    uses=frozenset({"agnostic_stage", "phases"}), recipe="raykd.recipes.lm.glmd:run_glmd", check_fn=no_hard_labels,
)
GLMD_VOCAB = Method(
    name="glmd_vocab",
    description="GLMD with vocabulary compression: a smaller student embedding/LM head over a mapped vocabulary",
    paper="Tan et al. 2023 (GLMD), vocabulary compression (the seed's build_map_vocab_for_student)",
    composes="as glmd, plus student.vocab_size: N (a count or a fraction of V) and student.vocab_map: "
             "decoder (the N most frequent train ids kept, every other id read as the kept id whose teacher "
             "embedding has the largest dot product with its own; cosine and euclidean also), or bucket "
             "(N - 1 kept + one OTHER entry); soft labels are mapped into the compressed vocabulary "
             "(merged ids sum their mass, where the seed renormalises over the kept ids)",
    uses=frozenset({"vocab"}), requires=frozenset({"vocab"}), check_fn=_glmd_vocab,
)
ROBUST_KD = Method(
    name="robust_kd",
    description="distil on perturbed inputs: a share of tokens replaced, the teacher labels the perturbed text",
    paper="GKD (Tan et al. 2023, GKD: A General Knowledge Distillation Framework for Large-scale "
          "Pre-trained Language Model), distill_random_data",
    composes="data.perturb_share > 0 (train split only); teacher terms (hard labels of perturbed text are noise)",
    uses=frozenset({"perturb"}), requires=frozenset({"perturb"}), check_fn=no_hard_labels,
)


METHODS = (KD, PD, ANNEALING_KD, CONTINUATION_KD, GLMD, GLMD_VOCAB, ROBUST_KD)
"""The logit methods, in the order ``raykd methods`` lists them."""
