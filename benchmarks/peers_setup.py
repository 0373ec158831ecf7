"""What the peer benchmark's arms share: teacher, student init, blocks, batch order
(``bench_peers.py``): SmolLM2 and the demo's BBC blocks, or a random-weight teacher of a known
shape with random blocks (``--synthetic``, ``--quick``)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine_gpu import SHAPES  # noqa: E402  (the teacher shapes of the GPU benchmarks)


QUICK_SHAPE = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 64, "vocab_size": 256, "tie_word_embeddings": True}
"""LlamaConfig fields of the ``--quick`` teacher (its student keeps layers 0 and 3)."""


@dataclass
class Setup:
    """What every arm shares: teacher, student init, blocks and the batch order.

    Attributes:
        teacher: the frozen teacher (eval mode).
        student: the student init (never trained; every arm trains a deep copy).
        train, held_out: blocks ``input_ids`` / ``attention_mask`` / ``loss_mask`` ``[N, T]``.
        order: the row indices of every step ``[steps, B]``.
        teacher_load_s: seconds to load or build the teacher.
        describe: what was set up, for the JSON.
        tokenizer: the teacher's tokenizer (TRL's trainer wants one; it reads only its pad id here).
    """

    teacher: torch.nn.Module
    student: torch.nn.Module
    train: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    order: np.ndarray
    teacher_load_s: float
    describe: dict
    tokenizer: object = None

def tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``t0 .. t{V-1}`` (``t0`` pads): the ``--quick`` teacher's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", unk_token="t1", eos_token="t2")


def synthetic_setup(args: argparse.Namespace) -> Setup:
    """A random-weight teacher of a known shape, its layer-dropped student and random token blocks
    (no files, no download): ``--quick`` a tiny shape in seconds, ``--synthetic`` SmolLM2-135M's
    shape at the demo's sizes (324 train / 77 held-out blocks of 128 tokens, 6 of 30 layers kept)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raykd.students import layer_drop
    from raykd.train.local import batch_indices

    if args.quick:
        shape, sizes, keep = QUICK_SHAPE, {"train": 8, "held_out": 4, "seq_len": 16, "steps": 6, "batch": 2}, [0, -1]
    else:
        shape, sizes, keep = SHAPES["smollm2-135m"], {"train": 324, "held_out": 77, "seq_len": 128, "steps": 80, "batch": 4}, [0, 6, 12, 18, 24, 29]
    layers = args.teacher_layers or shape["num_hidden_layers"]
    keep = spread(keep, shape["num_hidden_layers"], layers)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    teacher = LlamaForCausalLM(LlamaConfig(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=2048,
                                           pad_token_id=0)).eval()
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(args.seed)

    def blocks(n: int) -> dict[str, np.ndarray]:
        ids = rng.integers(1, shape["vocab_size"], size=(n, sizes["seq_len"]))
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids, dtype=bool)}

    steps, batch = args.steps or sizes["steps"], args.batch_size or sizes["batch"]
    train = blocks(args.train_blocks or sizes["train"])
    order = np.stack(list(batch_indices(len(train["input_ids"]), batch, steps, args.seed)))
    name = "tiny" if args.quick else "smollm2-135m"
    return Setup(teacher, layer_drop(teacher, keep), train, blocks(sizes["held_out"]), order, load_s,
                 {"teacher": f"{name} shape, {layers} layers, random weights; random token blocks", "student_layers": keep,
                  "k": args.k or (8 if args.quick else 32), "lr": 3e-4, "warmup_steps": 1 if args.quick else 8,
                  "steps": steps, "batch_size": batch, "seq_len": sizes["seq_len"]},
                 tiny_tokenizer(shape["vocab_size"]))


def spread(keep: list[int], layers: int, deeper: int) -> list[int]:
    """``keep``'s layer indices (negative: from the end) moved to the same relative depths of a
    teacher with ``deeper`` layers instead of ``layers``."""
    if deeper == layers:
        return [k % layers for k in keep]
    return [round((k % layers) * (deeper - 1) / (layers - 1)) for k in keep]


def real_setup(args: argparse.Namespace) -> Setup:
    """SmolLM2 (or a deeper random teacher of its config), the demo's student and its BBC blocks."""
    from transformers import AutoConfig, LlamaForCausalLM

    from raykd.config import DistillConfig, load_config
    from raykd.data import load_documents, tokenize_to_blocks
    from raykd.data.splits import hash_split, in_sample
    from raykd.models import load_causal_lm, load_tokenizer, resolve_model_path
    from raykd.students import layer_drop
    from raykd.train.local import batch_indices

    cfg = load_config(DistillConfig, args.config)
    path = resolve_model_path(cfg.teacher.model)
    tok = load_tokenizer(path)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    config_layers = AutoConfig.from_pretrained(path).num_hidden_layers
    if args.teacher_layers:
        config = AutoConfig.from_pretrained(path)
        config.num_hidden_layers = args.teacher_layers
        for drop in ("quantization_config", "layer_types"):
            if hasattr(config, drop):
                delattr(config, drop)
        teacher = LlamaForCausalLM(config).eval()
    else:
        teacher = load_causal_lm(path)
    load_s = time.perf_counter() - start
    d = cfg.data
    docs = [doc for doc in load_documents(d)]
    ids = np.array([doc.doc_id for doc in docs], dtype=object)
    keep = in_sample(ids, d.sample, d.split_seed)
    split = hash_split(ids, d.splits, d.split_seed)

    def blocks(name: str) -> dict[str, np.ndarray]:
        chosen = [doc for doc, k, s in zip(docs, keep, split) if k and s == name]
        batch = {"doc_id": np.array([c.doc_id for c in chosen], dtype=object), "text": np.array([c.text for c in chosen], dtype=object)}
        out = tokenize_to_blocks(batch, tok, seq_len=d.seq_len, max_blocks_per_doc=d.max_blocks_per_doc, min_tokens=d.min_tokens)
        return {k: out[k] for k in ("input_ids", "attention_mask", "loss_mask")}

    train = {k: v[: args.train_blocks] for k, v in blocks("train").items()}
    steps, batch = args.steps or cfg.train.max_steps, args.batch_size or cfg.train.batch_size
    order = np.stack(list(batch_indices(len(train["input_ids"]), batch, steps, args.seed)))
    keep_layers = spread(list(cfg.student.keep_layers), config_layers, args.teacher_layers or config_layers)
    held_out = {k: v[: args.held_out_blocks] for k, v in blocks("eval").items()}
    return Setup(teacher, layer_drop(teacher, keep_layers), train, held_out, order, load_s,
                 {"teacher": cfg.teacher.model + (f" config, {args.teacher_layers} layers, random weights" if args.teacher_layers else ""),
                  "student_layers": keep_layers, "k": args.k or cfg.labels.k, "lr": cfg.train.lr,
                  "warmup_steps": cfg.train.warmup_steps, "steps": steps, "batch_size": batch, "seq_len": d.seq_len}, tok)
