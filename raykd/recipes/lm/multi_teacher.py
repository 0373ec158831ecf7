"""Several served teachers for one distill run (TMKD, MT-BERT, Uncertainty, RL-KD).

Each entry of ``extra_teachers`` is a teacher like any other (its own Serve deployment, named by
``name``; a trained student folder works), labels the same blocks into its own cache keyed by its
own fingerprint, and the caches are joined by row (:mod:`raykd.soft_labels.join`). Tokenizers
are checked before any teacher is called; rows that do not line up are refused before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raykd.config import DistillConfig
from raykd.methods import get_method
from raykd.soft_labels.plan import Plan, ensure_soft_labels
from raykd.soft_labels.cache import shard_paths
from raykd.soft_labels.join import decode_joined, join_caches
from raykd.students import check_same_vocabulary
from raykd.train.evaluate import teacher_metrics


def extra_teacher_plans(cfg: DistillConfig, primary: Plan) -> list[Plan]:
    """One :class:`Plan` per extra teacher (same data and labels settings, its own cache keys).

    Raises:
        VocabularyMismatchError: a teacher's tokenizer or vocabulary differs from the first one's.
    """
    plans = []
    for teacher in cfg.extra_teachers:
        plan = Plan(cfg.model_copy(update={"teacher": teacher, "extra_teachers": []}))
        check_same_vocabulary(primary.tokenizer_fp, plan.tokenizer_fp, primary.vocab_size, plan.vocab_size)
        plans.append(plan)
    return plans


def _split_files(caches: dict[str, Any], split: str) -> list[str]:
    folder, manifest = caches[split]
    return shard_paths(folder, manifest)


def prepare_teachers(cfg: DistillConfig, primary: Plan, primary_caches: dict[str, Any], plans: list[Plan],
                     output_dir: Path) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Label with every extra teacher (cache hits ask nothing) and join the train caches by row.

    Returns:
        ``(joined train shard files, the loop's teacher settings, report entries)``; the report
        entries hold each extra teacher's held-out perplexity, its top-1 agreement with the first
        teacher and its cache.

    Raises:
        raykd.soft_labels.join.CacheJoinError: the caches' rows do not line up (the first
            mismatching row is named).
    """
    caches = [primary_caches] + [ensure_soft_labels(plan)[0] for plan in plans]
    names = [cfg.teacher.name] + [t.name for t in cfg.extra_teachers]
    train_files = join_caches([_split_files(c, "train") for c in caches], names, output_dir / "joined" / "train",
                              cfg.labels.rows_per_shard)
    eval_files = join_caches([_split_files(c, "eval") for c in caches], names, output_dir / "joined" / "eval",
                             cfg.labels.rows_per_shard)
    report = {}
    for i, (plan, c) in enumerate(zip(plans, caches[1:]), start=1):
        report[f"teacher_{cfg.extra_teachers[i - 1].name}"] = {
            **teacher_metrics(_split_files(c, "eval")),
            "top1_agreement": _top1_agreement(eval_files, len(caches), i),
            "model": cfg.extra_teachers[i - 1].model, "cache": str(c["train"][0]),
        }
    settings = {"combine": get_method(cfg.method).combine, "num_teachers": len(caches),
                "weight_temperature": cfg.multi_teacher.weight_temperature, "policy_lr": cfg.multi_teacher.policy_lr}
    return train_files, settings, report


def _top1_agreement(joined_files: list[str], num_teachers: int, i: int) -> float:
    """Share of valid held-out positions where teacher ``i``'s top-1 id equals teacher 0's."""
    import pyarrow.parquet as pq

    agree, n = 0, 0
    for f in joined_files:
        b = decode_joined(pq.read_table(f), num_teachers)
        m = b["loss_mask"].astype(bool)
        agree += int((b["topk_ids"][..., 0] == b[f"t{i}.topk_ids"][..., 0])[m].sum())
        n += int(m.sum())
    return agree / max(n, 1)

