"""The request a stored or submitted `Prompt` carries: text, token ids, chat messages, or one jsonl
line (OpenAI Batch or plain, parsed by `coordinator.openai_batch`)."""

from __future__ import annotations

from coordinator.openai_batch import parse_line
from coordinator.requests import Request, RequestError, RequestParams
from pqmesh.api.coordinator.v1 import coordinator_pb2


def from_prompt(prompt: coordinator_pb2.Prompt) -> Request:
    """The request a `Prompt` carries; a jsonl line is parsed here (RequestError when it is bad)."""
    kind = prompt.WhichOneof("kind")
    if kind == "jsonl_line":
        return parse_line(prompt.jsonl_line)
    custom_id = prompt.custom_id
    try:
        params = RequestParams.from_proto(prompt.params)
    except RequestError as err:
        raise RequestError(err.code, err.message, custom_id) from None
    if kind == "text":
        return Request(custom_id, text=prompt.text, params=params)
    if kind == "token_ids":
        return Request(custom_id, token_ids=tuple(prompt.token_ids.ids), params=params)
    if kind == "chat":
        messages = tuple((m.role, m.content) for m in prompt.chat.messages)
        return Request(custom_id, messages=messages, params=params)
    raise RequestError("invalid_request", "the prompt has neither text, token_ids, chat nor jsonl_line", custom_id)
