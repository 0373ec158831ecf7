"""On-policy batches: the student's own samples, scored by the served teacher (worker side).

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes") trains a share ``lambda`` of its batches on sequences the student
samples itself, with the teacher's token-level distributions on them as targets. Here that share
is ``on_policy.on_policy_share`` and one optimizer step is the unit: with that probability a step's
micro-batches (read from the soft-label cache as usual) are replaced by

1. prompts: the first ``prompt_tokens`` tokens of each cached block;
2. the student's own continuations: ``max_new_tokens`` tokens from its ``generate`` (sampling at
   ``on_policy.temperature``, greedy at 0), without gradients;
3. the served teacher's top-k + tail on prompt + continuation (``score``, as the cache stores it):
   every micro-batch's calls are sent as soon as it is sampled, so the teacher scores one
   micro-batch while the student samples the next, and several calls are in flight
   (:class:`~raykd.teacher.deployment.ResentCall` resends a call whose replica died);
4. a :class:`~raykd.train.step.StudentBatch` whose mask holds the positions that predict a
   sampled token, and nothing else (not the prompt, not what follows an EOS).

The step then runs through the same :func:`~raykd.train.step.train_step` and
:class:`~raykd.losses.Objective` as any step. The other steps train on the cache (off-policy).

DistiLLM (Ko et al. 2024) adds a replay buffer (:class:`ReplayBuffer`): fresh samples and their
teacher targets are kept, and an on-policy step reuses buffered ones with probability
``replay_share`` (no sampling, no teacher call; the samples come from older students, hence
"adaptive off-policy"). Simplified here: DistiLLM's scheduler raises the share of student
samples when the validation loss rises; here the shares are fixed.

Each step's time is split into ``sample_s`` (student generation), ``teacher_wait_s`` (blocked on
teacher answers, what the pipelining did not hide) and ``update_s`` (forward, backward,
optimizer; measured by the loop), logged in the history (:func:`time_split` sums them).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from raykd.config import OnPolicyConfig
from raykd.losses import TeacherTargets
from raykd.losses.targets import retemper
from raykd.train.step import StudentBatch


class Answer(Protocol):
    def result(self, timeout_s: float | None = None) -> dict[str, np.ndarray]: ...


ScoreFn = Callable[[np.ndarray, np.ndarray], Answer]
"""``(input_ids [B, L], attention_mask [B, L]) -> an answer`` whose ``result()`` is the teacher's
``score`` (``topk_ids`` / ``topk_logprobs`` ``[B, L, K]``, ``tail_logmass`` ``[B, L]``). Sending
must not wait for the answer."""


def served_score(app_name: str, k: int, temperature: float, attempts: int = 3) -> ScoreFn:
    """A :data:`ScoreFn` calling the running teacher application ``app_name`` through its Serve
    handle (works from any Ray worker, e.g. a Train worker)."""
    # lazy: keeps ray out of import time
    from raykd.teacher.apps import teacher_handle
    from raykd.teacher.deployment import ResentCall

    handle = teacher_handle(app_name)
    # priority 1: a Train worker waits on each answer, so its calls go ahead of bulk labeling
    return lambda ids, am: ResentCall(handle.score, ids, am, k=k, temperature=temperature, attempts=attempts, priority=1)


def prompts_of(batch: StudentBatch, prompt_tokens: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """The prompts of a cached micro-batch: each block's first ``prompt_tokens`` real tokens (a
    shorter block: all of it), left-padded for generation.

    Returns:
        ``(input_ids [B, P], attention_mask [B, P])`` with ``P = min(prompt_tokens, longest block)``.
    """
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"].long()
    lengths = am.sum(1).clamp(max=prompt_tokens)
    width = int(lengths.max())
    out = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros_like(out)
    for i, n in enumerate(lengths.tolist()):  # blocks are right-padded: their first n tokens are real
        out[i, width - n:], mask[i, width - n:] = ids[i, :n], 1
    return out, mask


@torch.no_grad()
def sample_continuations(model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                         temperature: float, stop_at_eos: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The student's continuations of left-padded prompts, re-aligned to start at position 0.

    Args:
        model: a causal LM with ``generate`` (not a DDP wrapper).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts (:func:`prompts_of`).
        max_new_tokens: ``N``, tokens sampled per prompt.
        temperature: sampling temperature; 0 is greedy.
        stop_at_eos: end a sample at its first EOS (kept); False samples all ``N`` tokens.

    Returns:
        ``(input_ids [B, P + N], attention_mask [B, P + N], mask [B, P + N])``, right-padded:
        each row is its prompt then its sample; ``mask`` is True at the positions whose next
        token was sampled (position ``t`` predicts token ``t + 1``), False elsewhere.
    """
    was_training = model.training
    model.eval()
    cfg = model.generation_config
    eos = cfg.eos_token_id if stop_at_eos else None
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else model.config.pad_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}  # plain sampling from the student's distribution, or greedy
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_ids or None, pad_token_id=pad, **sampling)
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen)
    finally:
        model.train(was_training)
    b, p = prompt_ids.shape
    new = out[:, p:]
    if new.shape[1] < max_new_tokens:  # every sample ended early
        new = torch.cat([new, new.new_full((b, max_new_tokens - new.shape[1]), pad)], 1)
    valid = torch.ones_like(new, dtype=torch.bool)
    if eos_ids:  # keep each sample up to and with its first EOS
        is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        valid = ~after
    n_prompt = prompt_mask.long().sum(1)
    width = p + max_new_tokens
    ids = prompt_ids.new_full((b, width), pad)
    am = torch.zeros((b, width), dtype=torch.long, device=ids.device)
    mask = torch.zeros((b, width), dtype=torch.bool, device=ids.device)
    for i in range(b):
        n, m = int(n_prompt[i]), int(valid[i].sum())
        ids[i, :n], ids[i, n:n + m] = prompt_ids[i, p - n:], new[i, :m]
        am[i, :n + m] = 1
        mask[i, n - 1:n + m - 1] = True  # positions n-1 .. n+m-2 predict the sampled tokens n .. n+m-1
    return ids, am, mask


def on_policy_batch(input_ids: Tensor, attention_mask: Tensor, mask: Tensor, targets: TeacherTargets) -> StudentBatch:
    """A micro-batch of samples: next-token labels on the masked (sampled) positions only."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = torch.where(mask[:, :-1], input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
    return StudentBatch({"input_ids": input_ids, "attention_mask": attention_mask}, labels, mask, targets)


def targets_of(scored: dict[str, np.ndarray], device) -> TeacherTargets:
    """Sparse targets from a teacher ``score`` answer."""
    as_t = lambda name, dtype: torch.as_tensor(np.asarray(scored[name]).astype(dtype)).to(device)  # noqa: E731
    return TeacherTargets.sparse(as_t("topk_ids", np.int64), as_t("topk_logprobs", np.float32),
                                 as_t("tail_logmass", np.float32))


class ReplayBuffer:
    """DistiLLM's replay buffer of student samples and their teacher targets (oldest dropped first).

    Rows are kept on the CPU: ``input_ids`` / ``attention_mask`` / ``mask`` ``[L]``, the sparse
    targets ``[L, K]`` / ``[L]``; every row has the same ``L = P + N``.

    Args:
        capacity: rows kept (>= 1).
        seed: seed of :meth:`draw`.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.rows: deque[dict[str, Tensor]] = deque(maxlen=capacity)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, batch: StudentBatch) -> None:
        """Keep every row of an on-policy micro-batch."""
        t = batch.targets
        fields = {"input_ids": batch.inputs["input_ids"], "attention_mask": batch.inputs["attention_mask"],
                  "mask": batch.mask, "topk_ids": t.topk_ids.int(), "topk_logprobs": t.topk_logprobs.half(),
                  "tail_logmass": t.tail_logmass.float()}
        for i in range(batch.mask.shape[0]):
            self.rows.append({k: v[i].detach().cpu() for k, v in fields.items()})

    def draw(self, n: int, device) -> StudentBatch:
        """``n`` distinct rows, uniformly at random, as a micro-batch on ``device``.

        Raises:
            ValueError: the buffer holds fewer than ``n`` rows.
        """
        if n > len(self.rows):
            raise ValueError(f"replay buffer holds {len(self.rows)} rows, {n} asked for")
        picked = [self.rows[i] for i in self.rng.sample(range(len(self.rows)), n)]
        s = {k: torch.stack([r[k] for r in picked]).to(device) for k in picked[0]}
        return on_policy_batch(s["input_ids"], s["attention_mask"], s["mask"],
                               TeacherTargets.sparse(s["topk_ids"], s["topk_logprobs"].float(), s["tail_logmass"]))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.extend(state["rows"])
        self.rng.setstate(state["rng"])


class OnPolicySampler:
    """Turns a step's cached micro-batches into on-policy ones with probability ``on_policy_share``.

    Args:
        cfg: the run's :class:`~raykd.config.OnPolicyConfig`.
        model: the student (unwrapped from DDP), sampled without gradients.
        score: sends a teacher ``score`` call (:data:`ScoreFn`, e.g. :func:`served_score`).
        cached_temperature: the temperature the teacher scores at (the cache's), re-tempered to
            each step's like the cached targets.
        seed: seed of the on-policy coin (the same on every worker, so all workers agree on a
            step's kind) and of the replay draws.
        rank: the worker's rank (its replay draws differ from the other workers').

    After each call, :attr:`last` holds the step's ``on_policy`` (1/0), ``replayed`` (1/0),
    ``sample_s``, ``teacher_wait_s`` and ``teacher_calls``.
    """

    def __init__(self, cfg: OnPolicyConfig, model, score: ScoreFn, *, cached_temperature: float, seed: int = 0,
                 rank: int = 0):
        self.cfg, self.model, self.score, self.cached_temperature = cfg, model, score, cached_temperature
        self.coin = random.Random(seed)
        self.replay = ReplayBuffer(cfg.replay_size, seed=seed * 1_000_003 + rank) if cfg.replay_size else None
        self.last: dict[str, float] = {}

    def __call__(self, group: Sequence[StudentBatch], temperature: float) -> list[StudentBatch]:
        """The step's micro-batches: ``group`` itself (off-policy) or the student's samples."""
        on = self.coin.random() < self.cfg.on_policy_share
        reuse = self.coin.random() < self.cfg.replay_share  # drawn every step: the coin's sequence is fixed
        self.last = {"on_policy": float(on), "replayed": 0.0, "sample_s": 0.0, "teacher_wait_s": 0.0, "teacher_calls": 0.0}
        if not on:
            return list(group)
        rows = [b.mask.shape[0] for b in group]
        if self.replay is not None and reuse and len(self.replay) >= sum(rows):
            self.last["replayed"] = 1.0
            out = [self.replay.draw(n, group[0].mask.device) for n in rows]
        else:
            out = self.fresh(group)
            if self.replay is not None:
                for b in out:
                    self.replay.add(b)
        return [StudentBatch(b.inputs, b.labels, b.mask, retemper(b.targets, self.cached_temperature, temperature))
                for b in out]

    def fresh(self, group: Sequence[StudentBatch]) -> list[StudentBatch]:
        """Sample every micro-batch, sending its teacher calls at once, then collect the answers."""
        cfg, pending = self.cfg, []
        pad = self.model.config.pad_token_id or 0
        for batch in group:
            t0 = time.perf_counter()
            prompt, prompt_mask = prompts_of(batch, cfg.prompt_tokens, pad)
            ids, am, mask = sample_continuations(self.model, prompt, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                                                 temperature=cfg.temperature, stop_at_eos=cfg.stop_at_eos)
            self.last["sample_s"] += time.perf_counter() - t0
            ids_np, am_np = ids.cpu().numpy(), am.cpu().numpy()
            calls = [self.score(ids_np[s:s + cfg.teacher_batch], am_np[s:s + cfg.teacher_batch])
                     for s in range(0, ids_np.shape[0], cfg.teacher_batch)]
            self.last["teacher_calls"] += len(calls)
            pending.append((ids, am, mask, calls))
        out = []
        for ids, am, mask, calls in pending:
            t0 = time.perf_counter()
            answers = [c.result() for c in calls]
            self.last["teacher_wait_s"] += time.perf_counter() - t0
            scored = {k: np.concatenate([a[k] for a in answers]) for k in ("topk_ids", "topk_logprobs", "tail_logmass")}
            out.append(on_policy_batch(ids, am, mask, targets_of(scored, ids.device)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"coin": self.coin.getstate(), "replay": self.replay.state_dict() if self.replay is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coin.setstate(state["coin"])
        if self.replay is not None and state.get("replay") is not None:
            self.replay.load_state_dict(state["replay"])


TIME_KEYS = ("data_s", "sample_s", "teacher_wait_s", "update_s")


def time_split(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where an on-policy run's step time went, from its history.

    Returns:
        ``steps``, ``on_policy_steps``, ``replayed_steps``, ``teacher_calls``, per key of
        :data:`TIME_KEYS` the seconds summed over all steps, the same summed over on-policy steps
        only (``on_policy_<key>``), and ``teacher_wait_share`` = teacher wait / step time over the
        on-policy steps (what the pipelining left of the teacher's time on the step's path).
    """
    on = [r for r in history if r.get("on_policy")]
    out: dict[str, Any] = {"steps": len(history), "on_policy_steps": len(on),
                           "replayed_steps": int(sum(r.get("replayed", 0) for r in history)),
                           "teacher_calls": int(sum(r.get("teacher_calls", 0) for r in history))}
    for key in TIME_KEYS:
        out[key] = float(sum(r.get(key, 0.0) for r in history))
        out[f"on_policy_{key}"] = float(sum(r.get(key, 0.0) for r in on))
    total_on = sum(out[f"on_policy_{k}"] for k in TIME_KEYS)
    out["teacher_wait_share"] = out["on_policy_teacher_wait_s"] / total_on if total_on > 0 else 0.0
    return out


@torch.inference_mode()
def teacher_loglik_of_continuations(student, teacher, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                                    batch_size: int = 8, pad_id: int = 0) -> dict[str, float]:
    """A generation-quality measure: the teacher's mean log-likelihood per token of the student's
    greedy continuations of ``prompts``.

    Args:
        student, teacher: causal LMs on the same tokenizer (the teacher in this process).
        prompts: token id lists (e.g. the first tokens of held-out blocks).
        max_new_tokens: tokens generated per prompt (fewer if the student ends at EOS).
        batch_size: prompts per generate call.

    Returns:
        ``teacher_logprob`` (mean over every generated token of log p_teacher(token | prefix),
        nats), ``student_logprob`` (the same under the student), ``tokens`` (tokens scored) and
        ``distinct_2`` (distinct bigrams / bigrams over the continuations, a repetition check).
    """
    t_sum = s_sum = 0.0
    n = 0
    bigrams: list[tuple[int, int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        am = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], am[i, width - len(p):] = torch.as_tensor(list(p)), 1
        seq, seq_am, mask = sample_continuations(student, ids, am, max_new_tokens=max_new_tokens, temperature=0.0)
        nxt = seq[:, 1:]
        m = mask[:, :-1]
        for model, acc in ((teacher, "t"), (student, "s")):
            logp = torch.log_softmax(model(input_ids=seq, attention_mask=seq_am).logits[:, :-1].float(), -1)
            total = float(logp.gather(-1, nxt[..., None]).squeeze(-1)[m].double().sum())
            if acc == "t":
                t_sum += total
            else:
                s_sum += total
        n += int(m.sum())
        for row, rm in zip(nxt.tolist(), m.tolist()):
            toks = [t for t, keep in zip(row, rm) if keep]
            bigrams += list(zip(toks, toks[1:]))
    return {"teacher_logprob": t_sum / max(n, 1), "student_logprob": s_sum / max(n, 1), "tokens": n,
            "distinct_2": len(set(bigrams)) / max(len(bigrams), 1)}
