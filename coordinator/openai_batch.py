"""JSONL lines in and out: OpenAI Batch API request lines (as the OpenAI Batch API and `vllm run-batch`
use them) and the plain ``{"prompt"}`` / ``{"token_ids"}`` lines; OpenAI Batch output lines.

Input: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``.
Every body key is either honoured (model, messages / prompt, max_tokens, max_completion_tokens,
temperature, top_p, top_k, seed, stop, user) or accepted only at its no-op value (n=1, stream=false,
logprobs=false, echo=false, presence/frequency penalty 0); anything else is a `RequestError` for that
line. Plain lines take the same generation keys next to ``prompt`` / ``token_ids`` and ``custom_id``.

Output: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` where the
body is a ``chat.completion`` or ``text_completion`` object with choices and usage, or, for a refused
request, status 400 with an OpenAI error body and ``error`` = ``{"code", "message"}``.
"""

from __future__ import annotations

import json
import numbers

from coordinator.requests import CHAT, COMPLETIONS, Request, RequestError, RequestParams
from pqmesh.api.coordinator.v1 import coordinator_pb2

_PARAMS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
_NOOPS = {"n": 1, "stream": False, "logprobs": False, "echo": False, "presence_penalty": 0,
          "frequency_penalty": 0}
_ROLES = {"system", "user", "assistant", "developer"}


def parse_line(line: str) -> Request:
    """The request of one jsonl line; RequestError (with the custom_id when it could be read) if bad."""
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        raise RequestError("invalid_json", f"the line is not JSON ({err})") from None
    if not isinstance(item, dict):
        raise RequestError("invalid_request", "a line must be a JSON object")
    custom_id = item.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) else ""
    try:
        return _openai(item, custom_id) if "url" in item or "body" in item else _plain(item, custom_id)
    except RequestError as err:
        raise RequestError(err.code, err.message, custom_id) from None


def _plain(item: dict, custom_id: str) -> Request:
    _refuse_unknown(item, {"prompt", "token_ids", "custom_id"} | _PARAMS, "a plain line")
    params = _params(item, "max_tokens")
    prompt, ids = item.get("prompt"), item.get("token_ids")
    if isinstance(prompt, str) and ids is None:
        return Request(custom_id, text=prompt, params=params)
    if prompt is None and _is_ids(ids):
        return Request(custom_id, token_ids=tuple(ids), params=params)
    raise RequestError("invalid_request", 'expected {"prompt": "text"} or {"token_ids": [ids]}, or an OpenAI '
                                          'Batch line with "url" and "body"')


def _openai(item: dict, custom_id: str) -> Request:
    _refuse_unknown(item, {"custom_id", "method", "url", "body"}, "a batch line")
    if not isinstance(item.get("custom_id"), str) or not item["custom_id"]:
        raise RequestError("invalid_request", "custom_id must be a non-empty string")
    if item.get("method", "POST") != "POST":
        raise RequestError("invalid_request", f"method must be POST, got {item.get('method')!r}")
    url, body = item.get("url"), item.get("body")
    if url not in (CHAT, COMPLETIONS):
        raise RequestError("invalid_url", f"url must be {CHAT} or {COMPLETIONS}, got {url!r}")
    if not isinstance(body, dict):
        raise RequestError("invalid_request", "body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    feed = "messages" if url == CHAT else "prompt"
    allowed = {"model", "user", feed} | _PARAMS | set(_NOOPS) | ({"max_completion_tokens"} if url == CHAT else set())
    _refuse_unknown(body, allowed, f"a {url} body")
    for key, neutral in _NOOPS.items():
        if key in body and body[key] != neutral:
            raise RequestError("unsupported_parameter", f"{key}={body[key]!r} is not supported; use {neutral!r} "
                                                        "or leave it out")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise RequestError("invalid_request", "model must be a string")
    limit = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    params = _params(body, limit)
    if url == CHAT:
        return Request(custom_id, CHAT, messages=_messages(body.get("messages")), params=params, model=model,
                       stop_on_eos=True)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a one-prompt batch
    if isinstance(prompt, str):
        return Request(custom_id, COMPLETIONS, text=prompt, params=params, model=model, stop_on_eos=True)
    if _is_ids(prompt):
        return Request(custom_id, COMPLETIONS, token_ids=tuple(prompt), params=params, model=model, stop_on_eos=True)
    raise RequestError("invalid_request", "prompt must be a string or a list of token ids (one prompt per line)")


def _refuse_unknown(item: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise RequestError("unsupported_parameter", f"{what} does not take {', '.join(unknown)}; supported: "
                                                    f"{', '.join(sorted(allowed))}")


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _number(body: dict, key: str, kind):
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or (kind is int and (not isinstance(value, int) and not float(value).is_integer())):
        raise RequestError("invalid_request", f"{key} must be {'an integer' if kind is int else 'a number'}, "
                                              f"got {value!r}")
    return kind(value)


def _params(body: dict, limit_key: str) -> RequestParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("invalid_request", "stop must be a string or a list of strings")
    return RequestParams(_number(body, limit_key, int), _number(body, "temperature", float),
                         _number(body, "top_p", float), _number(body, "top_k", int), _number(body, "seed", int),
                         tuple(stop or ()))


def _messages(value) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise RequestError("invalid_request", "messages must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise RequestError("invalid_request", f"messages[{i}] needs a role among {sorted(_ROLES)}")
        _refuse_unknown(message, {"role", "content", "name"}, f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError("unsupported_parameter", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError("invalid_request", f"messages[{i}].content must be a string or text parts")
        out.append((message["role"], content))
    return tuple(out)


# -- output ---------------------------------------------------------------------------------------------
_FINISH = {coordinator_pb2.FINISH_REASON_EOS: "stop", coordinator_pb2.FINISH_REASON_STOP: "stop",
           coordinator_pb2.FINISH_REASON_LENGTH: "length"}
PLAIN_REASONS = {coordinator_pb2.FINISH_REASON_EOS: "eos", coordinator_pb2.FINISH_REASON_STOP: "stop",
                 coordinator_pb2.FINISH_REASON_LENGTH: "length", coordinator_pb2.FINISH_REASON_ERROR: "error"}


def usage(r: coordinator_pb2.SequenceResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def output_line(r: coordinator_pb2.SequenceResult, job_id: str, model: str, created: int) -> dict:
    """The OpenAI Batch output object of one result."""
    request_id = f"{job_id}-{r.index}"
    line = {"id": f"batch_req_{request_id}", "custom_id": r.custom_id or None}
    if r.finish_reason == coordinator_pb2.FINISH_REASON_ERROR:
        error = {"message": r.error, "type": "invalid_request_error", "param": None, "code": r.error_code}
        line["response"] = {"status_code": 400, "request_id": request_id, "body": {"error": error}}
        line["error"] = {"code": r.error_code, "message": r.error}
        return line
    reason = _FINISH.get(r.finish_reason, "stop")
    if r.endpoint == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                  "finish_reason": reason}
        body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": reason}
        body = {"id": f"cmpl-{request_id}", "object": "text_completion"}
    body.update(created=created, model=r.model or model, choices=[choice], usage=usage(r))
    line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    line["error"] = None
    return line


def plain_line(r: coordinator_pb2.SequenceResult) -> dict:
    """The plain output object of a result whose request was a plain line (or a Prompt message)."""
    line = {"index": r.index, "token_ids": list(r.token_ids), "text": r.text,
            "finish_reason": PLAIN_REASONS.get(r.finish_reason, "")}
    if r.custom_id:
        line["custom_id"] = r.custom_id
    line["usage"] = usage(r)
    if r.finish_reason == coordinator_pb2.FINISH_REASON_ERROR:
        line["error"] = {"code": r.error_code, "message": r.error}
    return line


def result_line(r: coordinator_pb2.SequenceResult, job_id: str, model: str, created: int,
                openai: bool | None = None) -> str:
    """One output jsonl line in the OpenAI format (``openai``) or the plain one; with None, OpenAI for
    OpenAI requests and refused lines that named a custom_id, plain otherwise."""
    if openai is None:
        openai = bool(r.endpoint) or (r.finish_reason == coordinator_pb2.FINISH_REASON_ERROR and bool(r.custom_id))
    return json.dumps(output_line(r, job_id, model, created) if openai else plain_line(r))


def looks_openai(line: str) -> bool:
    """Whether a jsonl line is an OpenAI Batch request line (decides an output file's format)."""
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return isinstance(item, dict) and ("url" in item or "body" in item)
