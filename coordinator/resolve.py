"""From a stored prompt to what the scheduler runs: token ids (tokenized, or rendered with the chat
template), the request's effective generation parameters over the job's defaults, its stop tokens and
stop strings; or, when the request cannot run, the error result that takes its place.

Seeds: a request with its own ``seed`` samples from that seed alone (the same seed and prompt give the
same completion wherever the line sits in the file); otherwise prompt i of a job samples from a seed
derived from (job seed, i).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from coordinator.prompts import from_prompt
from coordinator.requests import Request, RequestError
from coordinator.scheduler import context_error
from coordinator.settings import GenerationSettings
from coordinator.stops import StopStrings
from coordinator.store import PendingPrompt, ResultRecord
from coordinator.text import TextCodec
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.coordinator.v1 import coordinator_pb2

_MASK64 = (1 << 64) - 1
ERROR = coordinator_pb2.FINISH_REASON_ERROR


def sequence_seed(job_seed: int, index: int) -> int:
    """Seed of prompt ``index`` of a job (splitmix64 of the pair): distinct per prompt, independent of
    slots and micro-batches, so sampled outputs are the same whatever the batching."""
    z = (job_seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass(frozen=True)
class ResultMeta:
    """What a result carries besides its tokens."""

    custom_id: str = ""
    endpoint: str = ""
    model: str = ""
    prompt_tokens: int = 0
    stops: StopStrings | None = None


@dataclass(frozen=True)
class Resolved:
    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_ids: frozenset[int]
    sampling: tensor_pb2.SamplingParams
    meta: ResultMeta


def served_names(model_id: str, model_dir: Path | None = None) -> frozenset[str]:
    """Names a request's ``model`` may use: ``default``, the model id and its directory name."""
    names = {"default", model_id, Path(model_id).name}
    if model_dir is not None:
        names.add(Path(model_dir).name)
    return frozenset(n for n in names if n)


class Resolver:
    def __init__(self, max_tokens: int, codec: TextCodec | None = None, vocab_size: int | None = None,
                 eos_ids: frozenset[int] = frozenset(), model_names: frozenset[str] = frozenset({"default"}),
                 served_model: str = "") -> None:
        self.max_tokens, self.codec, self.vocab_size, self.eos_ids = max_tokens, codec, vocab_size, eos_ids
        self.model_names, self.served_model = model_names, served_model
        self._end_of_turn = codec.end_of_turn_ids() if codec is not None else frozenset()

    def stored(self, pending: PendingPrompt, settings: GenerationSettings) -> Resolved | ResultRecord:
        """A stored prompt resolved, or its error result."""
        return self.stored_many([pending], settings)[0]

    def stored_many(self, rows: Sequence[PendingPrompt], settings: GenerationSettings) -> list[Resolved | ResultRecord]:
        """Stored prompts resolved (or their error results), in order (`resolve_many`)."""
        return self.resolve_many([(row.index, self._request(row)) for row in rows], settings)

    def resolve_many(self, requests: Sequence[tuple[int, Request | ResultRecord]],
                     settings: GenerationSettings) -> list[Resolved | ResultRecord]:
        """(index, request) pairs resolved, or their error results (an error result given stays), in order;
        their plain texts are tokenized in one batch (the tokenizer's own threads), not one call each."""
        texts = {i: r.text for i, (_, r) in enumerate(requests) if isinstance(r, Request) and r.text}
        encoded = dict(zip(texts, self.codec.encode_many(list(texts.values())))) if texts and self.codec else {}
        out: list[Resolved | ResultRecord] = []
        for i, (index, request) in enumerate(requests):
            if isinstance(request, ResultRecord):
                out.append(request)
                continue
            try:
                out.append(self.resolve(index, request, settings, encoded.get(i)))
            except RequestError as err:
                out.append(self.error(index, err, request))
        return out

    def _request(self, pending: PendingPrompt) -> Request | ResultRecord:
        if pending.request is None:
            return Request(token_ids=tuple(pending.token_ids))
        try:
            return from_prompt(coordinator_pb2.Prompt.FromString(pending.request))
        except RequestError as err:
            return self.error(pending.index, err)

    def resolve(self, index: int, request: Request, settings: GenerationSettings,
                encoded: list[int] | None = None) -> Resolved:
        """``request`` resolved; ``encoded``: its text's token ids when already tokenized."""
        if request.model and request.model not in self.model_names:
            raise RequestError("model_not_found", f"model {request.model!r} is not served here; use one of "
                                                  f"{sorted(self.model_names)}")
        prompt = self._ids(request, encoded)
        p = request.params
        max_new = self._budget(len(prompt), p.max_tokens, settings.max_new_tokens, bool(request.endpoint))
        stop_on_eos = settings.stop_on_eos if request.stop_on_eos is None else request.stop_on_eos
        stop_ids = self.eos_ids if stop_on_eos else frozenset()
        if request.messages is not None:
            stop_ids = stop_ids | self._end_of_turn
        seed = sequence_seed(p.seed, 0) if p.seed is not None else sequence_seed(settings.seed, index)
        sampling = tensor_pb2.SamplingParams(
            temperature=settings.temperature if p.temperature is None else p.temperature,
            top_k=settings.top_k if p.top_k is None else p.top_k,
            top_p=settings.top_p if p.top_p is None else p.top_p, seed=seed)
        stops = None
        if p.stop:
            if self.codec is None:
                raise RequestError("unsupported_parameter", "stop strings need a tokenizer; this coordinator has "
                                                            "none (start it with --tokenizer DIR)")
            stops = StopStrings(p.stop, self.codec.decode)
        model = self.served_model if request.model in ("", "default") else request.model
        meta = ResultMeta(request.custom_id, request.endpoint, model or request.model, len(prompt), stops)
        return Resolved(tuple(prompt), max_new, frozenset(stop_ids), sampling, meta)

    def _ids(self, request: Request, encoded: list[int] | None = None) -> list[int]:
        if request.token_ids is not None:
            ids = list(request.token_ids)
            bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
            if bad:
                limit = f"0..{self.vocab_size - 1}" if self.vocab_size is not None else ">= 0"
                raise RequestError("invalid_request", f"token ids {bad[:5]} are outside the vocabulary ({limit})")
        elif self.codec is None:
            raise RequestError("invalid_request", "text and chat prompts need a tokenizer and this coordinator has "
                                                  "none (start it with --tokenizer DIR); send token ids instead")
        elif request.messages is not None:
            if not self.codec.has_chat_template:
                raise RequestError("invalid_request", f"the tokenizer in {self.codec.directory} has no chat "
                                                      "template; send /v1/completions prompts instead")
            ids = self.codec.chat(request.messages)
        else:
            ids = (encoded if encoded is not None else self.codec.encode(request.text)) if request.text else []
        if not ids:
            raise RequestError("invalid_request", "the prompt is empty; give text or at least one token id")
        return ids

    def _budget(self, prompt_len: int, asked: int | None, default: int, clamp: bool) -> int:
        """New tokens to generate: ``asked``, else the job default (OpenAI requests: cut to what fits)."""
        wanted = asked if asked is not None else default
        if asked is None and clamp:
            wanted = max(1, min(wanted, self.max_tokens - prompt_len))  # at least one new token
        param = "max_tokens" if asked is not None or clamp else "max_new_tokens"
        problem = context_error(prompt_len, wanted, self.max_tokens, param)
        if problem is not None:
            raise RequestError("context_length_exceeded", problem)
        return wanted

    @staticmethod
    def error(index: int, err: RequestError, request: Request | None = None) -> ResultRecord:
        return ResultRecord(index, [], "", ERROR, custom_id=request.custom_id if request else err.custom_id,
                            error=err.message, error_code=err.code, endpoint=request.endpoint if request else "",
                            model=request.model if request else "")


def finished_record(index: int, generated: list[int], reason: int, meta: ResultMeta | None,
                    decode) -> ResultRecord:
    """The result of a finished sequence: its text (cut at a stop string) and its metadata."""
    text = decode(generated) if decode else ""
    if meta is None:
        return ResultRecord(index, generated, text, reason)
    if meta.stops is not None and reason == coordinator_pb2.FINISH_REASON_STOP:
        text = meta.stops.cut(text)
    return ResultRecord(index, generated, text, reason, custom_id=meta.custom_id, prompt_tokens=meta.prompt_tokens,
                        endpoint=meta.endpoint, model=meta.model)


