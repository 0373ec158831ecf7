"""Sequence-level KD (Kim & Rush 2016, "Sequence-Level Knowledge Distillation", EMNLP).

The student is trained on what the teacher *writes* rather than on the corpus: each training
document's first ``generation.prompt_tokens`` tokens prompt the served teacher (``generate``,
greedy by default, the mode approximation of the paper's beam search), and the prompt plus the
teacher's continuation replaces the document. The run then continues as the main job: the
teacher labels the new text (so word-level terms such as ``forward_kl`` can be added, the
paper's Seq-KD + Word-KD), students train on it, and evaluation uses the real held-out articles.
Generations are cached by teacher, data and generation settings (a rerun asks nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raykd.config import DistillConfig, default_cache_root
from raykd.models import load_tokenizer
from raykd.recipes.lm.distill import run_distill
from raykd.soft_labels.generations import DONE, generate_documents, generations_dir
from raykd.soft_labels.plan import Plan


def run_seqkd(cfg: DistillConfig, output_dir: Path) -> dict[str, Any]:
    """Run sequence-level KD; the report adds ``prepare`` (generation cache, tokens, seconds).

    Raises:
        ValueError: ``cfg.generation`` is missing (before any work).
    """
    if cfg.generation is None:
        raise ValueError("method 'seqkd' needs a `generation:` section (prompt_tokens, max_new_tokens, temperature)")

    plans: list[Plan] = []

    def generate(plan: Plan) -> dict[str, Any]:
        plans.append(plan)
        root = (Path(cfg.labels.cache_dir).expanduser().parent if cfg.labels.cache_dir else default_cache_root()) / "generations"
        teacher = plan.teacher_meta()
        train_docs = plan.documents("train")  # the prompts: read into the driver (a seqkd run is small)
        if not (generations_dir(root, teacher, train_docs, cfg.generation) / DONE).is_file():
            # the teacher stays up for the labeling that follows, which stops it if this run started it
            plan.teacher.acquire()
        docs, stats = generate_documents(
            train_docs, app_name=cfg.teacher.name, tokenizer=load_tokenizer(plan.teacher_path),
            teacher=teacher, gen=cfg.generation, cache_root=root, num_actors=cfg.labels.num_labelers)
        plan.set_train_docs(docs)
        return {"generations": stats, "example": docs[0].text[:300]}

    try:
        return run_distill(cfg, output_dir, prepare=generate)
    finally:  # a failure between generating and labeling leaves the teacher this run started
        if plans:
            plans[0].teacher.release()
