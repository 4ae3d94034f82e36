"""`pqmesh run-batch` without --coordinator on the embedded SmolLM2-135M-Instruct: it starts a local mesh
(profile, planner, stage, coordinator), lets the planner choose, runs an OpenAI Batch file and stops
every process; every custom_id comes back exactly once with usage, a bad line gets an error line, and
the chat answers are real answers (the chat template was applied)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from batch_helpers import chat_line, completion_line

from cli.main import main as cli


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_run_batch_on_a_local_mesh_of_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.setattr("cli.main.configure", lambda *args, **kwargs: None)
    questions = ["What is the capital of France?", "What colour is the sky on a clear day?"]
    lines = [chat_line(f"chat-{i}", q, max_tokens=16) for i, q in enumerate(questions)]
    lines += [completion_line("text", "The ocean is", max_tokens=6), '{"custom_id": "broken", ']
    source, out, work = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "work"
    source.write_text("\n".join(lines) + "\n")
    assert cli(["run-batch", "-i", str(source), "-o", str(out), "--quick-profile", "--workdir", str(work)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(str(r["custom_id"]) for r in rows) == sorted(["chat-0", "chat-1", "text", "None"])
    by_id = {r["custom_id"]: r for r in rows}
    for custom_id in ("chat-0", "chat-1", "text"):
        body = by_id[custom_id]["response"]["body"]
        assert body["model"] == "smollm2-135m-instruct" and body["usage"]["completion_tokens"] >= 1
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert "Paris" in by_id["chat-0"]["response"]["body"]["choices"][0]["message"]["content"]
    assert by_id[None]["error"]["code"] == "invalid_json"
    assert processes_mentioning(str(work)) == []  # every server stopped
