"""Intermediate-layer (feature) methods on the decoder student: the teacher's features from the
feature cache or from the teacher run in each Train worker."""

from __future__ import annotations

from collections.abc import Callable

from raykd.methods.registry import DistillConfig, Method


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

DISTILBERT_KD = _feature_method_entry(
    name="distilbert_kd",
    description="KD + CE + cosine between the last mapped hidden states (on the decoder student)",
    paper="Sanh et al. 2019, DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter",
    composes=f"train.students {{forward_kl: a, ce: b, distilbert_cos: c}}; {_LAYERS}. The paper's student is "
             "initialised from every other teacher layer, as layer_drop does",
    term="distilbert_cos",
)
PATIENT_KD = _feature_method_entry(
    name="patient_kd",
    description="KD + CE + MSE of L2-normalised hidden states at the mapped layers (PKD-Skip on a decoder: every token)",
    paper="Sun et al. 2019, Patient Knowledge Distillation for BERT Model Compression (EMNLP)",
    composes=f"train.students {{forward_kl: a, ce: b, pkd: beta}}, train.loss_params {{pkd: {{first_token_only: 0}}}} "
             f"(a decoder has no [CLS]: every token); {_LAYERS}",
    term="pkd",
)
TINYBERT_KD = _feature_method_entry(
    name="tinybert_kd",
    description="KD + CE + MSE of embeddings, hidden states and attention scores at the mapped layers",
    paper="Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding (Findings of EMNLP)",
    composes=f"train.students {{forward_kl: a, ce: b, tinybert: c}}; {_LAYERS}; as many student heads as teacher "
             "heads (layer_drop keeps them). One stage: the paper's general-then-task schedule and data augmentation "
             "are not here",
    term="tinybert",
)
MINILMV2_KD = _feature_method_entry(
    name="minilmv2_kd",
    description="KD + CE + KL of Q-Q, K-K, V-V self-relations of the last student layer (relation heads)",
    paper="Wang et al. 2021, MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained "
          "Transformers (Findings of ACL)",
    composes=f"train.students {{forward_kl: a, ce: b, minilmv2: c}}, train.loss_params {{minilmv2: {{relation_heads: "
             f"r}}}} (r divides the query and the key/value widths of both models); {_LAYERS}",
    term="minilmv2",
)


UNIVERSAL_KD = _feature_method_entry(
    name="universal_kd",
    description="KD + CE + KL between each mapped student layer and an attention mix of all teacher layers",
    paper="Wu et al. 2021, Universal-KD: Attention-based Output-Grounded Intermediate Layer Knowledge Distillation "
          "(EMNLP); the maps into a common hidden-size space as GKD's seed (not the paper's output space)",
    composes=f"train.students {{forward_kl: a, ce: b, universal_kd: c}}, train.loss_params {{universal_kd: "
             f"{{first_token_only: 0, size: d}}}} (pooled over real tokens; the per-layer maps train with the student "
             f"and are dropped at export); {_LAYERS}",
    term="universal_kd",
)
SID = _feature_method_entry(
    name="sid",
    description="stacked internal distillation: attention KL + pooled-state cosine, layers unlocked stage by stage, "
                "then KD + CE",
    paper="Aguilar et al. 2020, Knowledge Distillation from Internal Representations (AAAI); stages as GKD's seed "
          "(sid_lim_e=avg: max_steps / (L + 1) steps each)",
    composes=f"train.students {{forward_kl: a, ce: b, sid: c}}, train.loss_params {{sid: {{first_token_only: 0, "
             f"threshold: t}}}}; the stage schedule (StackedSchedule) gates the logit terms off until every mapped "
             f"layer is unlocked and keeps the stage in the train state; equal widths and head counts; {_LAYERS}",
    term="sid",
)
DIITO = _feature_method_entry(
    name="diito",
    description="KD + CE + KD between interchange-intervened forwards of student and teacher at an aligned layer",
    paper="Wu et al. 2022, Causal Distillation for Language Models (NAACL), weights as GKD's seed (0.25 each)",
    composes=f"train.students {{forward_kl: a, ce: b, diito: c}}, train.loss_params {{diito: {{interchange_prop: "
             f"0.3, cos_weight: 1}}}}; the teacher online in the Train worker (train.feature_teacher: online: the "
             f"intervened teacher forward has no cached form); {_LAYERS}",
    term="diito",
)


MINILM_KD = _feature_method_entry(
    name="minilm_kd",
    description="KD + CE + KL of the last mapped layer's self-attention distributions and value relations",
    paper="Wang et al. 2020, MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained "
          "Transformers (NeurIPS)",
    composes=f"train.students {{forward_kl: a, ce: b, minilm: c}}; {_LAYERS}; as many student heads as teacher heads "
             "(layer_drop keeps them). The paper distils task-agnostically on a pre-training corpus; here on the job's text",
    term="minilm",
)
ALP_KD = _feature_method_entry(
    name="alp_kd",
    description="KD + CE + MSE between each mapped student layer and an attention mix of all teacher layers",
    paper="Passban et al. 2021, ALP-KD: Attention-Based Layer Projection for Knowledge Distillation (AAAI)",
    composes=f"train.students {{forward_kl: a, ce: b, alp_kd: c}}, train.loss_params {{alp_kd: {{first_token_only: 0}}}} "
             f"(every token: a decoder has no [CLS]); {_LAYERS} (only its student side: every teacher layer takes part)",
    term="alp_kd",
)
CKD = _feature_method_entry(
    name="ckd",
    description="KD + CE + Huber loss of word relations and layer-transforming relations at the mapped layers",
    paper="Park et al. 2021, Distilling Linguistic Context for Language Model Compression (EMNLP); pair-wise "
          "relations only (the paper's triple-wise angles left out)",
    composes=f"train.students {{forward_kl: a, ce: b, ckd: c}}, train.loss_params {{ckd: {{word_weight: w, "
             f"layer_weight: l}}}}; {_LAYERS}",
    term="ckd",
)
MGSKD = _feature_method_entry(
    name="mgskd",
    description="KD + CE + Huber loss of token, span and sample relations at the mapped layers",
    paper="Liu et al. 2022, Multi-Granularity Structural Knowledge Distillation for Language Model Compression (ACL); "
          "spans are fixed windows, not the paper's phrases; no angles",
    composes=f"train.students {{forward_kl: a, ce: b, mgskd: c}}, train.loss_params {{mgskd: {{span: s}}}}; {_LAYERS}",
    term="mgskd",
)
LRC_BERT = _feature_method_entry(
    name="lrc_bert",
    description="KD + CE + contrastive loss of the mapped layers' pooled states (in-batch negatives)",
    paper="Fu et al. 2021, LRC-BERT: Latent-representation Contrastive Knowledge Distillation for Natural Language "
          "Understanding (AAAI); InfoNCE over cosines, not the paper's COS-NCE margin form",
    composes=f"train.students {{forward_kl: a, ce: b, lrc_bert: c}}, train.loss_params {{lrc_bert: {{tau: t}}}} "
             f"(negatives: the other rows of a micro-batch); {_LAYERS}",
    term="lrc_bert",
)


def _mixbaseline(cfg: DistillConfig) -> None:
    from raykd.losses import get_loss  # lazy: keeps torch out of importing the methods

    for name, weights in cfg.train.students.items():
        feature = [n for n, w in weights.items() if w > 0 and get_loss(n).kind == "features"]
        if len(feature) < 2 or weights.get("forward_kl", 0) <= 0:
            raise ValueError(f"method 'mixbaseline' sums the intermediate terms of several baselines with KD: student "
                             f"{name!r} needs forward_kl and at least two feature terms with weights > 0, got {weights}")


MIXBASELINE = Method(
    name="mixbaseline",
    description="several baselines at once: KD + a weighted sum of their intermediate-layer terms",
    paper="GKD (Tan et al. 2023, GKD: A General Knowledge Distillation Framework for Large-scale Pre-trained Language "
          "Model), mixbaseline (--mixbaseline_inter_bl TinyBERT,MiniLMv2,MiniLM,DistilBERT)",
    composes=f"train.students {{forward_kl: a, tinybert: b, minilmv2: c, distilbert_cos: d, ...}} (any registered "
             f"feature terms, each with its own weight and train.loss_params); {_LAYERS}. Left out: GKD's per-baseline "
             "temperatures (one temperature for the logit term) and its option to drop the intermediate terms for a "
             "second fine-tuning (a second run with train.students {forward_kl: 1} does that)",
    uses=_FEATURE_USES, requires=_FEATURE_REQUIRES, check_fn=_mixbaseline,
)


METHODS = (
    DISTILBERT_KD,
    PATIENT_KD,
    TINYBERT_KD,
    MINILMV2_KD,
    UNIVERSAL_KD,
    SID,
    DIITO,
    MINILM_KD,
    ALP_KD,
    CKD,
    MGSKD,
    LRC_BERT,
    MIXBASELINE,
)
"""The feature methods, in the order ``raykd methods`` lists them."""
