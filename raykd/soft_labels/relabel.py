"""A trained student labels documents through Ray Data batch inference, on the engine that
serves it as a teacher (:mod:`raykd.teacher.engines`): a classifier folder on the
``classifier`` engine (class log-probs), a causal LM folder on the ``hf`` engine (greedy text).

Used by MCKD: each stage's students relabel the half they did not train on, and the final
students label the test split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raykd import console
from raykd.soft_labels.pseudo_labels import PseudoLabels, first_line
from raykd.teacher.engines import build_engine


class EngineLabeler:
    """Ray Data actor: loads one engine on a model folder and labels batches.

    ``classifier``: rows of ``input_ids`` / ``attention_mask`` -> ``logprobs`` ``[B, C]``;
    ``hf``: rows of ``prompt`` -> ``text`` (greedy, ``max_new_tokens``).
    """

    def __init__(self, engine: str, folder: str, options: dict[str, Any]):
        self.kind = engine
        self.options = dict(options)
        self.engine = build_engine(engine, folder, num_threads=self.options.pop("num_threads", 1), device="cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind == "classifier":
            ids, mask = np.stack(batch["input_ids"]), np.stack(batch["attention_mask"])
            logp = self.engine.score(ids, mask)["class_logprobs"]
            return {"doc_id": batch["doc_id"], "logprobs": list(logp.astype(np.float32))}
        outs = self.engine.generate([str(p) for p in batch["prompt"]], max_new_tokens=self.options["max_new_tokens"],
                                    temperature=0.0, k=1)
        return {"doc_id": batch["doc_id"], "text": np.array([first_line(o["text"]) for o in outs], dtype=object)}


def relabel(engine: str, folder: str, rows: list[dict[str, Any]], *, batch_size: int = 32, num_threads: int = 1,
            num_cpus: float = 1.0, max_new_tokens: int = 24) -> PseudoLabels:
    """Labels of ``rows`` by the model in ``folder``, through Ray Data ``map_batches`` with one
    :class:`EngineLabeler` actor (Ray must be connected).

    Args:
        engine: ``classifier`` (rows carry ``doc_id``, ``input_ids``, ``attention_mask``) or
            ``hf`` (rows carry ``doc_id``, ``prompt``).
        folder: the student's model folder (``save_pretrained``).

    Returns:
        :class:`PseudoLabels` in the order of ``rows``.
    """
    import ray.data

    ds = ray.data.from_items(rows).map_batches(
        EngineLabeler, fn_constructor_args=(engine, str(folder), {"num_threads": num_threads, "max_new_tokens": max_new_tokens}),
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus, batch_format="numpy")
    with console.core_worker_noise_filtered():  # Ray Data's actor pool starts here
        got = {r["doc_id"]: r for r in ds.take_all()}
    ids = [str(r["doc_id"]) for r in rows]
    if engine == "classifier":
        return PseudoLabels(ids, np.stack([np.asarray(got[d]["logprobs"], dtype=np.float32) for d in ids]))
    return PseudoLabels(ids, texts=[str(got[d]["text"]) for d in ids])
