"""Methods with recipes of their own that chain runs (teacher assistants) or change the training
text (the teacher's generations)."""

from __future__ import annotations

from raykd.methods.registry import DistillConfig, Method


def _chain(cfg: DistillConfig) -> None:
    n_student = len(cfg.student.keep_layers)
    sizes = [len(a.keep_layers) for a in cfg.chain.assistants]
    if any(s <= n_student for s in sizes) or sizes != sorted(sizes, reverse=True):
        raise ValueError(f"method {cfg.method!r}: each teacher assistant must keep more layers than the student "
                         f"({n_student}) and fewer than the one before it; chain.assistants keep {sizes}")


SEQKD = Method(
    name="seqkd",
    description="sequence-level KD: the student trains on the teacher's own continuations of the training text",
    paper="Kim & Rush 2016, Sequence-Level Knowledge Distillation (EMNLP)",
    composes="generation: {prompt_tokens, max_new_tokens, temperature: 0 (greedy)}; the prompt + continuation "
             "replaces each training document; train.students {ce: 1} (Seq-KD) or with forward_kl (Seq-KD + Word-KD)",
    uses=frozenset({"generate"}), requires=frozenset({"generate"}), recipe="raykd.recipes.lm.seqkd:run_seqkd",
)
TAKD = Method(
    name="takd",
    description="teacher -> teacher assistant(s) -> student; each trained TA is served as the next teacher",
    paper="Mirzadeh et al. 2020, Improved Knowledge Distillation via Teacher Assistant (AAAI)",
    composes="chain.assistants: [{keep_layers: [...]}, ...] (largest first); each stage a main-job run whose "
             "exported student is served as the next stage's teacher",
    uses=frozenset({"chain"}), requires=frozenset({"chain"}), recipe="raykd.recipes.lm.chains:run_takd", check_fn=_chain,
)
DGKD = Method(
    name="dgkd",
    description="densely guided KD: the teacher and every earlier TA teach each later model (soft labels averaged)",
    paper="Son et al. 2021, Densely Guided Knowledge Distillation using Multiple Teacher Assistants (ICCV)",
    composes="as takd; each stage's teachers are the teacher and all earlier TAs, joined by row and averaged "
             "(tmkd's mean); no random teacher dropping",
    uses=frozenset({"chain"}), requires=frozenset({"chain"}), combine="mean", recipe="raykd.recipes.lm.chains:run_takd",
    check_fn=_chain,
)


METHODS = (SEQKD, TAKD, DGKD)
"""The chains methods, in the order ``raykd methods`` lists them."""
