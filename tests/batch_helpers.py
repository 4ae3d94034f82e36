"""Helpers of the batch-job tests: a tiny random Llama that speaks the embedded SmolLM2 tokenizer (so
its real chat template applies), OpenAI Batch lines, and a free loopback port."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

SMOL_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_chat_checkpoint(directory: Path, layers: int = 2, seed: int = 0):
    """A random 2-layer Llama with SmolLM2's vocabulary, tokenizer and chat template (EOS = <|im_end|> = 2)."""
    from pqmesh.model.embedded import prepare

    config = tiny_config("llama", layers)
    config.vocab_size = SMOL_VOCAB
    config.max_position_embeddings = 512
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    source = prepare()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    return model


def chat_line(custom_id: str, content: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "default", "messages": [{"role": "user", "content": content}], **body}})


def completion_line(custom_id: str, prompt, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": prompt, **body}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)
