"""Exporting a trained student as a servable model folder."""

from __future__ import annotations

import shutil
from pathlib import Path


def export_student(checkpoint: Path, init_dir: Path, out_dir: Path) -> Path:
    """Copy a trained student's weights and the tokenizer (and vocabulary map, if any) of its
    initial folder into ``out_dir``: a model folder that can be served as a teacher."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in [*Path(checkpoint).iterdir(), *Path(init_dir).iterdir()]:
        if src.is_file() and not (out_dir / src.name).exists() and not src.name.endswith(".pt") and src.name != "history.json":
            shutil.copy2(src, out_dir / src.name)
    return out_dir


def param_count(model_path: Path) -> int:
    """Parameter count from the safetensors header (no weights loaded); tied weights count once."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
    return total
