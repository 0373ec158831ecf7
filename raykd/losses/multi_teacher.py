"""Several teachers, one target: per-token teacher weights and the sparse mixture they give.

Every multi-teacher method turns M teachers' sparse soft labels into ONE :class:`TeacherTargets`
that any registry loss accepts; methods differ only in the weights ``w [B, T, M]`` (summing to
one over M):

* ``mean``    TMKD (Yang et al. 2020): ``w = 1 / M``;
* ``truth``   MT-BERT (Wu et al. 2021): per example, softmax over teachers of each teacher's mean
  log-likelihood of the real next tokens (``label_logprobs``), divided by a temperature;
* ``entropy`` Uncertainty: per token, softmax over teachers of minus the entropy of the teacher's
  K + 1 buckets, divided by a temperature (a confident teacher counts more);
* ``policy``  RL-KD (Yuan et al. 2021): one-hot, one teacher per example sampled by
  :class:`TeacherPolicy`.

The mixture of sparse distributions (:func:`mix_sparse`) lists the union of the teachers' top-k
ids; an id's mass is ``sum_m w_m p_m(id)`` over the teachers that list it (a lower bound: a
teacher's mass on an id outside its top-k is inside its tail), and the tail is
``sum_m w_m tail_m`` so the K' + 1 buckets sum to one exactly; a teacher with weight 0 lists no
ids, so a one-hot weight gives exactly the chosen teacher. Duplicate ids are merged and the
freed slots are padding (id -1, log-prob -inf), which the losses ignore. Pure torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from raykd.losses.targets import TeacherTargets, merge_duplicate_ids, teacher_buckets
from raykd.registry import Registry


def mix_sparse(targets: Sequence[TeacherTargets], weights: Tensor) -> TeacherTargets:
    """The weighted mixture of M sparse teachers as one sparse target with K' = sum of their K.

    Args:
        targets: M sparse teacher targets over the same [B, T].
        weights: [B, T, M] (or broadcastable, e.g. [B, 1, M]) non-negative, summing to 1 over M.

    Returns:
        Sparse :class:`TeacherTargets`: ``topk_ids`` [B, T, K'] (-1 = padding),
        ``topk_logprobs`` (log of the mixed masses, -inf on padding) and ``tail_logmass``.

    Raises:
        ValueError: a target is dense, or the shapes differ.
    """
    if any(t.form != "sparse" for t in targets):
        raise ValueError("mix_sparse takes sparse teacher targets (top-k soft labels from the caches)")
    if len({t.batch_shape for t in targets}) != 1:
        raise ValueError(f"teachers disagree on [B, T]: {[t.batch_shape for t in targets]}")
    ids, probs, tails = [], [], []
    for m, t in enumerate(targets):
        _, log_p = teacher_buckets(t, 1.0)  # renormalised K + 1 buckets (tail last)
        w = weights[..., m : m + 1].float()
        ids.append(torch.where(w > 0, t.topk_ids, -1))  # a teacher with weight 0 lists nothing
        probs.append(w * log_p[..., :-1].exp())
        tails.append(w * log_p[..., -1:].exp())
    merged_ids, merged_p = merge_duplicate_ids(torch.cat(ids, -1), torch.cat(probs, -1))
    tail = torch.cat(tails, -1).sum(-1)
    return TeacherTargets.sparse(merged_ids, merged_p.log(), tail.log())


def bucket_entropy(target: TeacherTargets) -> Tensor:
    """[B, T] entropy (nats) of a sparse teacher's K + 1 buckets (the tail counted as one)."""
    _, log_p = teacher_buckets(target, 1.0)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, 0.0).sum(-1)


def _softmax_weights(scores: Tensor, temperature: float) -> Tensor:
    return torch.softmax(scores / temperature, dim=-1)


def mean_weights(targets, label_logprobs, mask, temperature):  # noqa: ARG001 (one signature for all)
    """TMKD: equal weights ``1 / M``, as [B, 1, M]."""
    b = targets[0].batch_shape[0]
    return torch.full((b, 1, len(targets)), 1.0 / len(targets))


def truth_weights(targets, label_logprobs, mask, temperature):
    """MT-BERT: per example, softmax over teachers of the mean log-likelihood of the real next
    tokens over the valid positions, / ``temperature``; [B, 1, M]."""
    m = mask.float().unsqueeze(-1)  # [B, T, 1]
    mean_ll = (label_logprobs.float() * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, M]
    return _softmax_weights(mean_ll, temperature).unsqueeze(1)


def entropy_weights(targets, label_logprobs, mask, temperature):  # noqa: ARG001
    """Uncertainty: per token, softmax over teachers of minus the bucket entropy / ``temperature``; [B, T, M]."""
    return _softmax_weights(-torch.stack([bucket_entropy(t) for t in targets], -1), temperature)


WeightFn = Callable[[Sequence[TeacherTargets], Tensor, Tensor, float], Tensor]


@dataclass(frozen=True)
class Combiner:
    """A rule that turns M teachers into one target (the ``combine`` of a multi-teacher method).

    Attributes:
        name: the rule's name (:attr:`raykd.methods.Method.combine`).
        description: one line, with the method it comes from.
        weights: ``fn(targets, label_logprobs [B, T, M], mask [B, T], temperature) -> weights
            [B, T or 1, M]``; None for a learned rule (``policy``), whose weights a
            :class:`TeacherPolicy` samples and learns during training.
    """

    name: str
    description: str
    weights: WeightFn | None = None

    @property
    def learned(self) -> bool:
        """Whether the weights come from a :class:`TeacherPolicy` trained beside the student."""
        return self.weights is None


COMBINERS: Registry[Combiner] = Registry("teacher combination")
"""Every rule by name (see the module docstring), registered below."""
for _combiner in (
    Combiner("mean", "TMKD: every teacher weighs 1 / M", mean_weights),
    Combiner("truth", "MT-BERT: per example, by each teacher's likelihood of the real text", truth_weights),
    Combiner("entropy", "Uncertainty: per token, by each teacher's confidence", entropy_weights),
    Combiner("policy", "RL-KD: one teacher per example, sampled by a learned TeacherPolicy"),
):
    COMBINERS.add(_combiner.name, _combiner)


def teacher_weights(combine: str, targets: Sequence[TeacherTargets], label_logprobs: Tensor, mask: Tensor,
                    temperature: float = 1.0) -> Tensor:
    """Weights ``[B, T or 1, M]`` of the ``combine`` rule (see the module docstring).

    Raises:
        KeyError: (a :class:`~raykd.registry.UnknownNameError`) an unknown rule; the message lists
            the valid ones.
        ValueError: a learned rule (``policy``): its weights come from a :class:`TeacherPolicy`.
    """
    rule = COMBINERS.get(combine)
    if rule.weights is None:
        raise ValueError(f"teacher combination {combine!r} is learned: its weights come from a TeacherPolicy "
                         "(raykd.train.teachers.TeacherMix runs one)")
    return rule.weights(targets, label_logprobs, mask, temperature)


def teacher_features(targets: Sequence[TeacherTargets], label_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-example features of each teacher for the selection policy: mean bucket entropy and mean
    log-likelihood of the real next tokens over the valid positions; [B, M, 2]."""
    m = mask.float()
    n = m.sum(1).clamp(min=1.0)
    ent = torch.stack([(bucket_entropy(t) * m).sum(1) / n for t in targets], -1)
    ll = (label_logprobs.float() * m.unsqueeze(-1)).sum(1) / n.unsqueeze(-1)
    return torch.stack([ent, ll], -1)


class TeacherPolicy(nn.Module):
    """RL-KD's teacher-selection policy (Yuan et al. 2021, "Reinforced Multi-Teacher Selection for
    Knowledge Distillation"), kept small: a linear score per teacher from its per-example features
    (:func:`teacher_features`), a softmax over teachers, one teacher sampled per example, and a
    REINFORCE update with a moving-average baseline.

    Args:
        num_features: F, features per teacher.
        lr: learning rate of the policy's SGD.
        baseline_decay: decay of the reward baseline's moving average.
    """

    def __init__(self, num_features: int = 2, lr: float = 0.05, baseline_decay: float = 0.9):
        super().__init__()
        self.score = nn.Linear(num_features, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)  # starts uniform over teachers
        self.optim = torch.optim.SGD(self.parameters(), lr=lr)
        self.baseline_decay = baseline_decay
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def probs(self, features: Tensor) -> Tensor:
        """[B, M] selection probabilities from features [B, M, F] (standardised per batch)."""
        f = (features - features.mean((0, 1), keepdim=True)) / features.std((0, 1), keepdim=True).clamp(min=1e-6)
        return torch.softmax(self.score(f).squeeze(-1), dim=-1)

    def select(self, features: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sample one teacher per example: ``(actions [B] int64, one-hot weights [B, 1, M])``."""
        with torch.no_grad():
            p = self.probs(features)
        actions = torch.multinomial(p, 1, generator=generator).squeeze(-1)
        return actions, nn.functional.one_hot(actions, p.shape[-1]).float().unsqueeze(1)

    def update(self, features: Tensor, actions: Tensor, rewards: Tensor) -> float:
        """One REINFORCE step: raise the log-probability of actions with reward above the baseline.

        Args:
            features: [B, M, F] the features the actions were sampled from.
            actions: [B] chosen teachers.
            rewards: [B] rewards of those choices.

        Returns:
            The policy loss (for logging).
        """
        rewards = rewards.detach().float()
        if not bool(self.seen):
            self.baseline.fill_(float(rewards.mean()))
            self.seen.fill_(True)
        advantage = rewards - self.baseline
        log_p = self.probs(features).clamp(min=1e-9).log().gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        loss = -(advantage * log_p).mean()
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        self.baseline.mul_(self.baseline_decay).add_((1 - self.baseline_decay) * rewards.mean())
        return float(loss.detach())
