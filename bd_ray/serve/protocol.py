"""The bd-ray server's protocol: OpenAI-compatible request models and errors (OpenAI API, vLLM
conventions), and :class:`EngineRequest`, the typed request the ingress hands the engine.

Requests follow the OpenAI Completions and Chat Completions APIs (``prompt``/``messages``,
``max_tokens``, ``temperature``, ``top_p``, ``stop`` (a string or a list), ``seed``, ``stream``,
``stream_options``, ``n`` (up to :data:`MAX_N` choices, each its own row of the engine's batch:
no shared prefill; with ``seed``, choice ``i`` is seeded ``seed + i``), ``logprobs`` (completions:
an integer k; chat: ``logprobs`` + ``top_logprobs``: the verifier's *raw* log-probabilities, before
temperature / top-k / top-p, as vLLM's default, one entry per emitted token and none for text cut
by a stop string), ``echo`` (completions, without logprobs)), vLLM's ``top_k`` and ``ignore_eos``,
and the bd-ray extensions (sent by the ``openai`` client through ``extra_body``):

* ``speculative`` (bool): speculative decoding on/off for this request (default: serve config);
* ``gamma`` (int >= 1): a fixed γ, tokens drafted per step (unset: the batch speculation policy
  chooses γ per step up to the serve config's ``spec.gamma``);
* ``kv_budget`` (int >= 1 or ``"full"``): the drafter's KV budget in tokens (``"full"`` = no
  sparsity), a :data:`bd_ray.config.Budget` parsed by :func:`bd_ray.config.parse_budget`;
* ``sparse_policy`` (``"chunk_topk" | "streaming" | "snapkv"`` or a full
  :class:`bd_ray.config.SparsePolicyConfig` object).

Unknown fields are rejected (400 naming the field) rather than silently ignored, and OpenAI fields
bd-ray does not implement (penalties, ``logit_bias``, ``suffix``, tools...) are accepted only at
their "off" value. Every error is OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}`` (:func:`error_body`).

Hostile input is a 4xx, never a 5xx or a hang: every number is bounded (NaN and infinities fail
the bounds; the message names the field and the bound), bodies beyond :func:`max_request_bytes`
get 413, bodies that are not UTF-8 or not JSON get 400, an empty prompt or messages list gets 400.

Responses are ``text_completion`` / ``chat.completion`` objects (and ``*.chunk`` objects when
streaming, sent as server-sent events ending with ``data: [DONE]``) carrying ``usage`` and a
bd-ray ``spec_metrics`` object: ``mode`` (``speculative`` / ``plain`` / ``mixed``) and
``mode_reason``, ``drafted``, ``accepted``, ``alpha`` (acceptance rate), ``tau`` (mean accepted
length = tokens per verifier forward), ``per_position`` acceptance, the ``kv_budget`` it ran at
(``bd_ray.serve.engine.spec_metrics_dict``). ``usage.completion_tokens`` is the number of tokens
of the returned text (EOS included when it ended generation), ``max_tokens`` exactly when
``finish_reason`` is ``length``, summed over choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bd_ray.config import SamplingConfig, SparsePolicyConfig, SpecConfig, parse_budget

__all__ = [
    "ChatMessage",
    "CompletionRequest",
    "ChatCompletionRequest",
    "EngineRequest",
    "RequestError",
    "error_body",
    "validation_error_body",
    "max_request_bytes",
    "UNSUPPORTED_FIELDS",
    "MAX_TOKENS_LIMIT",
    "MAX_N",
    "MAX_LOGPROBS",
]

# Upper bounds of request numbers (the engine's SamplingConfig has the same ones).
MAX_TOKENS_LIMIT = 1_000_000
TOP_K_LIMIT = 1_000_000
MAX_N = 16            # choices per request (each is a row of the batch)
MAX_LOGPROBS = 20     # top alternatives per token (vLLM's default max_logprobs)


def max_request_bytes(max_model_len: int | None) -> int:
    """Largest accepted request body in bytes: 1 MiB, or 64 bytes per context token when that is
    more (a prompt that fits the context fits the body; anything bigger is rejected with 413
    before it is parsed or tokenized)."""
    return max(1 << 20, 64 * int(max_model_len or 0))

# OpenAI fields that are accepted only at their "off" value: name -> allowed values.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Base):
    include_usage: bool = False


class _SamplingFields(_Base):
    """Fields shared by both routes (OpenAI + vLLM ``top_k`` + bd-ray extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=TOP_K_LIMIT, description="vLLM extension; 0 or -1 = off")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None
    # accepted only at their "off" value (see UNSUPPORTED_FIELDS)
    suffix: Any = None
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS (benchmarks)")
    # bd-ray extensions
    speculative: bool | None = None
    gamma: int | None = Field(None, ge=1, le=128)
    kv_budget: int | Literal["full"] | None = None
    sparse_policy: Literal["chunk_topk", "streaming", "snapkv"] | SparsePolicyConfig | None = None

    @field_validator("kv_budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return None if v is None else parse_budget(v)  # None: the serve config's spec.budget

    def stop_list(self) -> list[str]:
        """``stop`` as a list (OpenAI accepts a string or a list); empty strings dropped."""
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in items if s]

    def unsupported(self) -> str | None:
        """Name of the first OpenAI field set to a value bd-ray does not implement, else ``None``."""
        for name, allowed in UNSUPPORTED_FIELDS.items():
            if getattr(self, name) not in allowed:
                return name
        return None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (OpenAI legacy completions): one prompt, a string or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="log-probabilities of each token "
                                 "and this many top alternatives")
    echo: bool = Field(False, description="return the prompt's text before the completion")

    def top_logprobs_k(self) -> int | None:
        """k alternatives per token, ``None`` = no logprobs."""
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            v = v[0]
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v


class ContentPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    """One chat message; ``content`` is a string or a list of ``{"type": "text"}`` parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: rendered with the verifier tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    parallel_tool_calls: Any = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def top_logprobs_k(self) -> int | None:
        """k alternatives per token, ``None`` = no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine runs it, built once by the ingress (``bd_ray.serve.payload``) and
    passed to ``SpecEngine.generate`` (pickled across Ray).

    Every default is already filled in from the serve config: ``spec`` is the complete
    :class:`bd_ray.config.SpecConfig` of this request (γ, KV budget, sparse policy, prefill chunk,
    adaptive γ), ``sampling`` its :class:`bd_ray.config.SamplingConfig` (``max_new_tokens`` within
    the context limit). ``logprobs``: k top alternatives per token (``None`` = no logprobs).
    ``attempt`` counts restarts after engine replica deaths (``bd_ray.serve.resilience``);
    ``engine_id`` is the id the engine registers it under.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    speculative: bool
    spec: SpecConfig
    logprobs: int | None = None
    attempt: int = 0

    def choice(self, index: int) -> "EngineRequest":
        """Choice ``index`` of an ``n > 1`` request: its own id and, when seeded, seed ``seed + index``
        (choice 0 equals the ``n = 1`` request)."""
        seed = self.sampling.seed
        sampling = self.sampling if seed is None else self.sampling.model_copy(
            update={"seed": (seed + index) % (2**63)})
        return dataclasses.replace(self, request_id=f"{self.request_id}-{index}", sampling=sampling)

    @property
    def engine_id(self) -> str:
        # a distinct id per attempt: the old call may linger on a live-but-unreachable replica
        return f"{self.request_id}-r{self.attempt}" if self.attempt else self.request_id

    @property
    def reproducible(self) -> bool:
        """Greedy or seeded: a restart regenerates the same tokens (so a stream can resume)."""
        return self.sampling.temperature == 0.0 or self.sampling.seed is not None

    def restarted(self, attempt: int) -> "EngineRequest":
        return dataclasses.replace(self, attempt=attempt)


class RequestError(Exception):
    """A request answered with an OpenAI error instead of a completion.

    Args:
        status: HTTP status code.
        message: the error message (ignored for the body when ``body`` is given).
        type, param, code: the OpenAI error fields (:func:`error_body`).
        headers: extra response headers (``Retry-After`` on 503).
        body: a ready OpenAI error JSON (e.g. :func:`validation_error_body`, an engine error event).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None, body: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else error_body(message, type=type, param=param, code=code)
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error_body(err: ValidationError) -> dict:
    """OpenAI error JSON for a pydantic request validation error; ``param`` names the first field.

    The message lists every problem as ``field: reason (got value)``.
    """
    problems = []
    first = None
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if _is_field(p)) or "body"
        first = first or loc
        msg = "unknown field (not an OpenAI or bd-ray request field)" if e["type"] == "extra_forbidden" else e["msg"]
        got = e.get("input")
        got_s = repr(got)
        if len(got_s) > 80:
            got_s = got_s[:77] + "..."
        problems.append(f"{loc}: {msg} (got {got_s})" if e["type"] != "missing" else f"{loc}: field required")
    return error_body("invalid request: " + "; ".join(problems), param=first, code="invalid_value")


# pydantic puts union member tags into error locations (e.g. "str", "list[int]"); drop them.
_TYPE_TAGS = {"str", "int", "float", "bool", "SparsePolicyConfig", "ContentPart", "StreamOptions"}


def _is_field(p: Any) -> bool:
    return isinstance(p, int) or (isinstance(p, str) and p.isidentifier() and p not in _TYPE_TAGS)
