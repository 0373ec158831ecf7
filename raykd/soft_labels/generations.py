"""Teacher generations, cached: prompts from documents -> teacher ``generate`` (Ray Serve) ->
one Parquet folder keyed like the soft labels (teacher, tokenizer, engine, dtype, data and
generation settings). A second run with the same key asks the teacher nothing.

Used by sequence-level KD (Kim & Rush 2016): the student trains on what the teacher writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from raykd import console
from raykd.config import GenerationConfig
from raykd.data import Document
from raykd.soft_labels.cache import documents_fingerprint

log = logging.getLogger(__name__)

DONE = "generations.json"


def generation_key(teacher: dict[str, Any], docs: list[Document], gen: GenerationConfig) -> str:
    """Hex digest (24 characters) of everything that changes the generations.

    Args:
        teacher: ``weights_fingerprint``, ``tokenizer_fingerprint``, ``engine`` and ``dtype``.
        docs: the documents whose prefixes are the prompts.
        gen: the generation settings.
    """
    fields = {name: teacher[name] for name in ("weights_fingerprint", "tokenizer_fingerprint", "engine", "dtype")}
    fields.update(data=documents_fingerprint(docs), **gen.model_dump(exclude={"batch_size"}))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def generations_dir(cache_root: Path, teacher: dict[str, Any], docs: list[Document], gen: GenerationConfig) -> Path:
    """Folder of the generation cache for these settings (finished when it holds ``generations.json``)."""
    return Path(cache_root) / generation_key(teacher, docs, gen)


def prompts_of(docs: list[Document], tokenizer: Any, prompt_tokens: int) -> list[str]:
    """Each document's first ``prompt_tokens`` tokens, decoded back to text."""
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(x[:prompt_tokens]) for x in ids]


def _read(folder: Path, columns: list[str]):
    """The Parquet shards of a generation folder as one table (the metadata file left out)."""
    import pyarrow.dataset as pads

    return pads.dataset(sorted(str(p) for p in Path(folder).glob("*.parquet")), format="parquet").to_table(columns=columns)


class _Generator:
    """Ray Data actor: a batch of prompts -> the teacher's completions (several calls in flight)."""

    def __init__(self, app_name: str, gen: dict[str, Any]):
        # lazy: keeps ray out of import time
        from raykd.teacher.apps import teacher_handle

        self.handle = teacher_handle(app_name)
        self.gen = gen

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        size = self.gen["batch_size"]
        pending = [
            self.handle.generate.remote(prompts[s : s + size], max_new_tokens=self.gen["max_new_tokens"],
                                        temperature=self.gen["temperature"], k=1, seed=self.gen["seed"])
            for s in range(0, len(prompts), size)
        ]
        outs = [o for p in pending for o in p.result()]
        return {"doc_id": batch["doc_id"], "prompt": batch["prompt"],
                "completion": np.array([o["text"] for o in outs], dtype=object),
                "new_tokens": np.array([len(o["token_ids"]) for o in outs], dtype=np.int32)}


def generate_documents(
    docs: list[Document],
    *,
    app_name: str,
    tokenizer: Any,
    teacher: dict[str, Any],
    gen: GenerationConfig,
    cache_root: Path,
    num_actors: int = 1,
) -> tuple[list[Document], dict[str, Any]]:
    """Teacher continuations of every document's prefix, from the cache or the running teacher.

    Args:
        docs: training documents (ids must be unique).
        app_name: the running teacher's Serve application (only used on a cache miss).
        tokenizer: the teacher's tokenizer (cuts the prompts).
        teacher: identity fields for the key (see :func:`generation_key`).
        gen: generation settings.
        cache_root: folder of generation caches (``<root>/<key>/``).
        num_actors: concurrent Ray Data generator actors.

    Returns:
        ``(documents, stats)``: one document per input, ``doc_id + "#gen"``, text = prompt +
        completion (same ``label``); stats has ``hit``, ``path``, ``new_tokens``, ``generate_s``.
    """
    final = generations_dir(cache_root, teacher, docs, gen)
    hit = (final / DONE).is_file()
    start = time.perf_counter()
    if not hit:
        import ray.data

        items = [{"doc_id": d.doc_id, "prompt": p} for d, p in zip(docs, prompts_of(docs, tokenizer, gen.prompt_tokens))]
        partial = final.parent / f"{final.name}.partial-{uuid.uuid4().hex[:8]}"
        ds = ray.data.from_items(items).map_batches(
            _Generator, fn_constructor_args=(app_name, gen.model_dump()), batch_size=gen.batch_size * 2,
            compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=0.25)
        with console.core_worker_noise_filtered():  # Ray Data's actor pool starts here
            ds.write_parquet(str(partial))
        table = _read(partial, ["new_tokens"])
        meta = {"rows": table.num_rows, "new_tokens": int(np.sum(table["new_tokens"].to_numpy())),
                "generate_s": time.perf_counter() - start, "teacher": teacher, "generation": gen.model_dump()}
        (partial / DONE).write_text(json.dumps(meta, indent=2))
        if final.exists():  # another run finished first: keep theirs
            shutil.rmtree(partial, ignore_errors=True)
        else:
            os.replace(partial, final)
    table = _read(final, ["doc_id", "prompt", "completion"])
    meta = json.loads((final / DONE).read_text())
    by_id = {d.doc_id: d for d in docs}
    out = [Document(f"{i}#gen", p + c, by_id[i].label)
           for i, p, c in zip(*(table[c].to_pylist() for c in ("doc_id", "prompt", "completion")))]
    out.sort(key=lambda d: d.doc_id)
    stats = {"hit": hit, "path": str(final), "rows": len(out), "new_tokens": meta["new_tokens"],
             "generate_s": 0.0 if hit else meta["generate_s"]}
    return out, stats
