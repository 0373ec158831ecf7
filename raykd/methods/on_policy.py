"""On-policy methods: the student's own samples, scored by the served teacher."""

from __future__ import annotations

from collections.abc import Callable

from raykd.methods.registry import DistillConfig, Method, no_hard_labels, objectives


def _on_policy_terms(loss: str, share: tuple[float, float] | None = None) -> Callable[[DistillConfig], None]:
    """The check of an on-policy method: teacher terms only (CE on the student's own samples would
    teach it its own samples), ``loss`` among them, and ``on_policy_share`` within ``share``."""

    def check(cfg: DistillConfig) -> None:
        no_hard_labels(cfg)
        if missing := [w for w in objectives(cfg) if w.get(loss, 0) <= 0]:
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

GKD = Method(
    name="gkd",
    description="generalized KD: a share of the steps on the student's own samples, scored by the served teacher; "
                "generalized JSD(beta)",
    paper="Agarwal et al. 2024, On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes "
          "(GKD, ICLR)",
    composes="on_policy: {on_policy_share: lambda, temperature: student sampling temperature, prompt_tokens, "
             "max_new_tokens}; train.students {generalized_jsd: 1}; train.loss_params {generalized_jsd: {beta}}; "
             "off-policy steps read the cache (real text labeled by the teacher)",
    uses=_ON_POLICY, requires=_ON_POLICY, check_fn=_on_policy_terms("generalized_jsd"),
)
DISTILLM = Method(
    name="distillm",
    description="skew KL on a mix of cached text and student samples, the samples kept in a replay buffer and reused",
    paper="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models (ICML)",
    composes="train.students {skew_kl: 1} (train.loss_params {skew_kl: {alpha: 0.1}}); on_policy: {on_policy_share, "
             "replay_size, replay_share}. Simplified: a fixed on_policy_share instead of the adaptive scheduler that "
             "raises it when the validation loss rises; an on-policy step reuses buffered samples with probability "
             "replay_share, else samples afresh and adds to the buffer (oldest dropped)",
    uses=_ON_POLICY, requires=_ON_POLICY, check_fn=_on_policy_terms("skew_kl"),
)
MINILLM = Method(
    name="minillm",
    description="reverse KL on the student's own samples only (MiniLLM's length-normalised single-step term)",
    paper="Gu et al. 2023, MiniLLM: Knowledge Distillation of Large Language Models (ICLR 2024)",
    composes="on_policy: {on_policy_share: 1, stop_at_eos: false}; train.students {reverse_kl: 1}: the per-token "
             "reverse KL over the teacher's top-k + tail buckets on every sampled position; all samples have "
             "max_new_tokens tokens, so the token mean is the mean of each sample's length-normalised sum. Left "
             "out: the long-term policy-gradient term, teacher-mixed sampling and the pre-training loss",
    uses=_ON_POLICY, requires=_ON_POLICY, check_fn=_minillm,
)


METHODS = (GKD, DISTILLM, MINILLM)
"""The on-policy methods, in the order ``raykd methods`` lists them."""
