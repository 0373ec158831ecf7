"""Held-out evaluation from a soft-label cache: perplexity, calibration (expected calibration
error of the next-token probabilities), top-1 agreement with the teacher and the forward KL from
the teacher's cached distribution to the student's.

The eval split is labeled like the train split, so the teacher's own numbers come from the cache
(``label_logprobs`` gives its perplexity, ``topk_ids[..., 0]`` its top-1 prediction) and a second
run asks the teacher nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raykd.losses.kd import kl_divergence
from raykd.losses.reduction import student_bucket_log_probs, with_tail_bucket
from raykd.losses.targets import TeacherTargets, teacher_buckets
from raykd.soft_labels.cache import iter_cache_batches
from raykd.students.vocab import VocabMap
from raykd.train.cross_tokenizer import TokenizerAlignment, aligned_metrics, teacher_bits_per_byte
from raykd.train.export import export_student, param_count


ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al. 2017)."""


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Per confidence bin: positions, summed confidence and summed correctness, float64 ``[3, bins]``.

    Args:
        confidence: ``[N]`` the probability of each position's predicted (top-1) token, in [0, 1].
        correct: ``[N]`` bool, the prediction equals the real next token.
        bins: equal-width bins over [0, 1] (a confidence of 1 falls in the last).
    """
    which = (confidence.double() * bins).long().clamp(0, bins - 1)
    out = torch.zeros(3, bins, dtype=torch.float64, device=confidence.device)
    for row, values in enumerate((torch.ones_like(confidence), confidence, correct)):
        out[row].index_add_(0, which, values.double())
    return out


def expected_calibration_error(counts: torch.Tensor) -> float:
    """ECE = sum over bins of (positions in bin / positions) * |accuracy - mean confidence|, of
    :func:`calibration_bins` counts summed over batches; Guo et al. 2017, "On Calibration of
    Modern Neural Networks" (0: calibrated; in [0, 1])."""
    n, conf, acc = counts
    return float((conf - acc).abs().sum() / n.sum().clamp(min=1))


def teacher_metrics(shard_files: list[str]) -> dict[str, float]:
    """Teacher perplexity on the cached split (``exp`` of the mean negative ``label_logprobs``)."""
    nll, n = 0.0, 0
    for b in iter_cache_batches(shard_files, 256):
        m = b["loss_mask"].astype(bool)
        nll -= float(b["label_logprobs"][m].astype(np.float64).sum())
        n += int(m.sum())
    return {"ppl": math.exp(nll / max(n, 1)), "top1_agreement": 1.0, "kl": 0.0, "tokens": n}


@torch.inference_mode()
def student_metrics(model, shard_files: list[str], batch_size: int = 16, device: str = "cpu",
                    vocab: VocabMap | None = None) -> dict[str, float]:
    """Perplexity of ``model`` on the split, top-1 agreement with the teacher and the forward KL
    from the teacher to the student.

    Args:
        model: causal LM returning ``logits [B, T, V]``.
        shard_files: eval-split cache shards.
        vocab: the compressed vocabulary of a GLMD student (None: the teacher's); its
            distribution is mapped back to the teacher's ids (see :mod:`raykd.students.vocab`),
            so perplexity and agreement are over the same tokens as for any other student.

    Returns:
        ``ppl`` (exp of the mean next-token NLL over ``loss_mask`` positions), ``ece`` (expected
        calibration error of the student's top-1 next-token probability against the real next
        token, :data:`ECE_BINS` bins), ``top1_agreement`` (share of those positions where the
        student's argmax equals the teacher's top-1 id), ``kl`` (mean KL(teacher || student) in
        nats per position at temperature 1, over the cache's K + 1 buckets: the top-k ids and
        the tail, as the sparse ``forward_kl`` loss sees them; a lower bound on the
        full-vocabulary KL), ``tokens`` (positions counted). On a cache of sampled soft labels
        the teacher's top-1 is its most drawn id and ``kl`` is taken from the drawn
        distribution (:mod:`raykd.soft_labels.sampled`): both are estimates.
    """
    model.eval()
    table = vocab.to_compressed().to(device) if vocab is not None else None
    nll, agree, kl, n, calib = 0.0, 0, 0.0, 0, 0.0
    for b in iter_cache_batches(shard_files, batch_size):
        ids = torch.tensor(b["input_ids"], device=device)
        am = torch.tensor(b["attention_mask"], device=device).long()
        mask = torch.tensor(b["loss_mask"], device=device).bool()
        logits = model(input_ids=ids if table is None else table[ids], attention_mask=am).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        m = mask[:, :-1]
        nxt = ids[:, 1:]
        if table is None:
            tok_lp, top1 = logp.gather(-1, nxt[..., None]).squeeze(-1), logits[:, :-1].argmax(-1)
            top1_lp = logp.amax(-1)
        else:
            tok_lp, top1 = _compressed_to_teacher(logp, nxt, table, vocab)
            top1_lp = _teacher_id_log_probs(logp, top1[..., None], table, vocab.group_log_freq().to(device)).squeeze(-1)
        nll -= float(tok_lp[m].double().sum())
        calib = calib + calibration_bins(top1_lp[m].exp(), (top1 == nxt)[m])
        teacher_top1 = torch.tensor(b["topk_ids"][:, :-1, 0], device=device)
        agree += int((top1 == teacher_top1)[m].sum())
        kl += float(_bucket_kl(logp, b, table, vocab)[m].double().sum())
        n += int(m.sum())
    ece = expected_calibration_error(calib) if n else float("nan")
    return {"ppl": math.exp(nll / max(n, 1)), "ece": ece, "top1_agreement": agree / max(n, 1), "kl": kl / max(n, 1),
            "tokens": n}


def _bucket_kl(logp: torch.Tensor, b: dict[str, np.ndarray], table: torch.Tensor | None, vocab: VocabMap | None) -> torch.Tensor:
    """[B, T-1] KL(teacher || student) over the K + 1 buckets of the cached top-k; ``logp``
    [B, T-1, V or N] holds the student's log-probs (over the compressed ids N when ``table``)."""
    dev = logp.device
    targets = TeacherTargets.sparse(*(torch.tensor(b[k][:, :-1], device=dev) for k in ("topk_ids", "topk_logprobs", "tail_logmass")))
    ids, log_p = teacher_buckets(targets, 1.0)
    if table is None:
        log_q = student_bucket_log_probs(logp, ids)
    else:  # the compressed student mapped back onto teacher ids, as for its perplexity
        log_q = with_tail_bucket(_teacher_id_log_probs(logp, ids, table, vocab.group_log_freq().to(dev)))
    return kl_divergence(log_p, log_q)


def _teacher_id_log_probs(logp: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, logf: torch.Tensor) -> torch.Tensor:
    """A compressed student's log-prob of teacher ``ids`` [..., K]: its entry's log-prob, plus the
    id's log-frequency share inside its entry's group (0 for an id alone in its entry)."""
    return logp.gather(-1, table[ids]) + logf[ids]


def _compressed_to_teacher(logp: torch.Tensor, nxt: torch.Tensor, table: torch.Tensor, vocab: VocabMap):
    """Log-prob of the real next teacher ids and the student's top-1 as a teacher id, for a
    compressed-vocabulary student (``logp`` [B, T, N] over the compressed ids)."""
    logf = vocab.group_log_freq().to(logp.device)
    tok_lp = _teacher_id_log_probs(logp, nxt[..., None], table, logf).squeeze(-1)
    return tok_lp, vocab.group_top_ids().to(logp.device)[logp.argmax(-1)]


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def evaluate_folder(model_dir: Path, shard_files: list[str], batch_size: int = 16,
                    vocab_dir: Path | None = None) -> dict[str, float]:
    """Load a ``save_pretrained`` folder and run :func:`student_metrics` on CPU; a vocabulary map
    in ``vocab_dir`` (default ``model_dir``) marks a compressed-vocabulary student."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return student_metrics(model, shard_files, batch_size, vocab=VocabMap.load(vocab_dir or model_dir))


def evaluate_students(teacher: dict[str, Any], init_dir: Path, results: dict[str, Any], eval_files: list[str],
                      output_dir: Path, *, batch_size: int, objectives: dict[str, dict[str, float]],
                      cross_tokenizer: bool = False) -> dict[str, Any]:
    """The report's model entries on the held-out soft labels: the teacher (from the cache), the
    untrained student and every trained student (perplexity of the real next tokens, top-1
    agreement with the teacher, forward KL from the teacher's buckets).

    Args:
        teacher: ``model`` (its name) and ``path`` (its folder, for the parameter count).
        init_dir: the untrained student's folder (tokenizer and vocabulary map of every student).
        results: ``{name: TrainResult}`` of the trained students.
        eval_files: the held-out cache's shards.
        output_dir: each trained student is exported as a servable folder ``students/<name>``.
        batch_size: rows per evaluation forward.
        objectives: each student's ``{loss: weight}`` (reported beside its numbers).
        cross_tokenizer: the students' tokenizer (``init_dir``'s) differs from the teacher's: they are
            evaluated on the blocks' text re-tokenised for them and aligned
            (:func:`raykd.train.cross_tokenizer.aligned_metrics`), and the teacher also reports its
            bits per byte (its perplexity is per teacher token, not comparable).

    Returns:
        ``{"students", "teacher", "student_init", <name>...}`` entries of the report.
    """
    n_student = param_count(init_dir)
    evaluate = functools.partial(evaluate_folder, vocab_dir=init_dir)
    teacher_entry = teacher_metrics(eval_files)
    if cross_tokenizer:
        alignment = TokenizerAlignment(teacher["path"], init_dir)
        teacher_entry["bits_per_byte"] = teacher_bits_per_byte(eval_files, alignment)
        evaluate = lambda folder, files, bs, **_: aligned_metrics(_load(folder), files, alignment, bs)  # noqa: E731
    report: dict[str, Any] = {
        "students": list(results),
        "teacher": {**teacher_entry, "model": teacher["model"], "params": param_count(Path(teacher["path"]))},
        "student_init": {**evaluate(init_dir, eval_files, batch_size), "params": n_student, "steps": 0},
    }
    for name, res in results.items():
        report[name] = {
            **evaluate(res.model_dir, eval_files, batch_size),
            "params": n_student,
            "objective": objectives[name],
            "steps": res.steps,
            "train_s": res.seconds,
            "final_train_loss": res.history[-1]["loss"] if res.history else None,
            "checkpoint": str(res.model_dir),
            "model_dir": str(export_student(res.model_dir, init_dir, output_dir / "students" / name)),
        }
    return report
