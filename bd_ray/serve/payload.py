"""OpenAI request -> :class:`bd_ray.serve.protocol.EngineRequest`: the ingress's translation.

One function, :func:`build_engine_request`, in small steps: checks of the request against what
is served (:func:`check_served`), the prompt as token ids (:func:`prompt_ids`, the chat template
for chat), the completion length within the context limit (:func:`completion_tokens`), the
speculative settings with the serve config's defaults filled in and the KV budget checked against
the sparse policy's minimum for this prompt (:func:`speculation`), and the sampling parameters
(:func:`sampling`). Every problem is a :class:`bd_ray.serve.protocol.RequestError` (400/404)
naming the field, so the engine only ever sees complete, valid requests.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from bd_ray.config import SamplingConfig, SpecConfig, check_budget
from bd_ray.config.serve import ServeAppConfig
from bd_ray.serve.protocol import ChatCompletionRequest, CompletionRequest, EngineRequest, RequestError
from bd_ray.sparse import min_budget

__all__ = ["build_engine_request", "check_served", "prompt_ids", "completion_tokens", "speculation", "sampling",
           "GREEDY_TEMPERATURE_EPS"]

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by a denormal
# temperature would overflow to inf and make the probabilities NaN.
GREEDY_TEMPERATURE_EPS = 1e-5

OpenAIRequest = CompletionRequest | ChatCompletionRequest


def _invalid(message: str, param: str, code: str = "invalid_value") -> RequestError:
    return RequestError(400, message, param=param, code=code)


def check_served(req: OpenAIRequest, cfg: ServeAppConfig, model_ids: list[str]) -> list[str]:
    """Check the model id, the OpenAI options bd-ray leaves unimplemented and the stop strings.

    Returns:
        The stop strings as a list.

    Raises:
        RequestError: 404 ``model_not_found``; 400 ``unsupported_parameter`` (an OpenAI field set
            to a value other than its "off" value, ``echo`` with ``logprobs``); 400 ``top_logprobs``
            without ``logprobs``; 400 more than ``ingress.max_stop_strings``.
    """
    if req.model is not None and req.model not in model_ids:
        raise RequestError(404, f"The model `{req.model}` does not exist. Served models: {model_ids}",
                           param="model", code="model_not_found")
    bad = req.unsupported()
    if bad:
        raise _invalid(f"{bad} is not supported by bd-ray (only its default/off value)", bad,
                       code="unsupported_parameter")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        raise _invalid("top_logprobs needs logprobs: true", "top_logprobs")
    if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
        raise _invalid("echo together with logprobs (prompt logprobs) is not supported by bd-ray", "echo",
                       code="unsupported_parameter")
    stops = req.stop_list()
    limit = cfg.ingress.max_stop_strings
    if len(stops) > limit:
        raise _invalid(f"at most {limit} stop strings, got {len(stops)}", "stop")
    return stops


def prompt_ids(req: OpenAIRequest, tokenizer: Any) -> tuple[list[int], str]:
    """The prompt as token ids, and the request field it came from (``prompt`` or ``messages``).

    Chat messages are rendered with the tokenizer's chat template; a completion prompt is text
    (tokenized) or token ids (checked against the vocabulary).

    Raises:
        RequestError: 400 no chat template, a template error, ids outside ``[0, vocab)``, or an
            empty prompt after tokenization.
    """
    if isinstance(req, ChatCompletionRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise _invalid("this model has no chat template; use /v1/completions or set model.chat_template in "
                           "the serve config", "messages", code="no_chat_template")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 -- template errors are the caller's (e.g. role order)
            raise _invalid(f"chat template failed: {exc}", "messages") from None
        ids, field = tokenizer(text, add_special_tokens=False)["input_ids"], "messages"
    elif isinstance(req.prompt, str):
        ids, field = tokenizer(req.prompt)["input_ids"], "prompt"
    else:
        ids, field = [int(t) for t in req.prompt], "prompt"
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise _invalid(f"prompt token ids must lie in [0, {vocab})", "prompt")
    if not ids:
        raise _invalid("prompt is empty after tokenization", field)
    return ids, field


def completion_tokens(req: OpenAIRequest, n_prompt: int, prompt_field: str, limit: int | None,
                      default: int) -> int:
    """``max_tokens`` (chat: ``max_completion_tokens`` first) within the context limit ``limit``
    (tokens, prompt + completion; ``None`` = unlimited); unset: ``default`` capped to what the
    limit leaves.

    Raises:
        RequestError: 400 ``context_length_exceeded`` naming the limit.
    """
    max_tokens = req.effective_max_tokens() if isinstance(req, ChatCompletionRequest) else req.max_tokens
    if limit is not None and n_prompt >= limit:
        raise RequestError(
            400, f"This model's maximum context length is {limit} tokens. However, your prompt has {n_prompt} "
                 f"tokens, leaving no room for a completion. Please reduce the length of the {prompt_field}.",
            param=prompt_field, code="context_length_exceeded")
    if max_tokens is None:
        return default if limit is None else min(default, limit - n_prompt)
    if limit is not None and n_prompt + max_tokens > limit:
        raise RequestError(
            400, f"This model's maximum context length is {limit} tokens. However, you requested "
                 f"{n_prompt + max_tokens} tokens ({n_prompt} in the {prompt_field}, {max_tokens} for the "
                 f"completion). Please reduce the length of the {prompt_field} or max_tokens.",
            param="max_tokens", code="context_length_exceeded")
    return max_tokens


def speculation(req: OpenAIRequest, cfg: ServeAppConfig, n_prompt: int) -> tuple[bool, SpecConfig]:
    """Whether the request speculates, and its complete :class:`SpecConfig`: the serve config's
    ``spec`` with the request's ``gamma`` (a fixed γ: ``adaptive`` off), ``kv_budget`` and
    ``sparse_policy`` (a name keeps the configured policy's parameters) applied.

    Raises:
        RequestError: 400 ``gamma`` above ``speculation.max_gamma``; 400 ``kv_budget`` below the
            sparse policy's minimum for this prompt (:func:`bd_ray.sparse.min_budget`, named).
    """
    speculative = cfg.speculation.enabled if req.speculative is None else req.speculative
    gamma = cfg.spec.gamma if req.gamma is None else req.gamma
    max_gamma = cfg.speculation.max_gamma
    if gamma > max_gamma:
        raise _invalid(f"gamma must be <= {max_gamma} (serve config speculation.max_gamma), got {gamma}", "gamma")
    budget = cfg.spec.budget if req.kv_budget is None else req.kv_budget
    policy = cfg.spec.policy
    if isinstance(req.sparse_policy, str):
        policy = policy.model_copy(update={"name": req.sparse_policy})
    elif req.sparse_policy is not None:
        policy = req.sparse_policy
    if speculative:
        try:
            check_budget(budget, min_budget(policy, n_prompt), policy.name, f"at prompt length {n_prompt}")
        except ValueError as exc:
            raise _invalid(f"kv_budget {exc}", "kv_budget") from None
    try:
        adaptive = cfg.spec.adaptive and req.gamma is None
        spec = SpecConfig.model_validate({**cfg.spec.model_dump(), "gamma": gamma, "budget": budget,
                                          "policy": policy.model_dump(), "adaptive": adaptive})
    except ValidationError as exc:  # not expected: every field was checked at the request's own bounds
        raise RequestError(400, f"invalid speculative settings: {exc}", code="invalid_value") from None
    return speculative, spec


def sampling(req: OpenAIRequest, cfg: ServeAppConfig, max_tokens: int, stops: list[str]) -> SamplingConfig:
    """The request's :class:`SamplingConfig`: its fields, or the serve config's ``defaults``
    (temperature below :data:`GREEDY_TEMPERATURE_EPS` is greedy; ``top_k`` -1 is 0, off;
    ``ignore_eos`` clears the EOS ids)."""
    d = cfg.defaults
    temperature = d.temperature if req.temperature is None else req.temperature
    if temperature < GREEDY_TEMPERATURE_EPS:
        temperature = 0.0
    fields = {"temperature": temperature, "top_p": d.top_p if req.top_p is None else req.top_p,
              "top_k": d.top_k if req.top_k is None else max(req.top_k, 0), "max_new_tokens": max_tokens,
              "seed": req.seed, "stop": stops, **({"eos_token_ids": []} if req.ignore_eos else {})}
    try:
        return SamplingConfig(**fields)
    except ValidationError as exc:  # not expected: the request's bounds are within SamplingConfig's
        raise RequestError(400, f"invalid sampling parameters: {exc}", code="invalid_value") from None


def build_engine_request(req: OpenAIRequest, cfg: ServeAppConfig, tokenizer: Any, model_ids: list[str],
                         max_model_len: int | None) -> EngineRequest:
    """Translate a validated OpenAI request into the :class:`EngineRequest` the engine runs.

    Args:
        req: a parsed ``/v1/completions`` or ``/v1/chat/completions`` body.
        cfg: the serve config (defaults, limits).
        tokenizer: the verifier's tokenizer (chat template set).
        model_ids: the served model id and its aliases.
        max_model_len: context limit in tokens (prompt + completion), ``None`` = none.

    Raises:
        RequestError: 400/404 as described by the steps (:func:`check_served`, :func:`prompt_ids`,
            :func:`completion_tokens`, :func:`speculation`).
    """
    stops = check_served(req, cfg, model_ids)
    ids, field = prompt_ids(req, tokenizer)
    max_tokens = completion_tokens(req, len(ids), field, max_model_len, cfg.defaults.max_tokens)
    speculative, spec = speculation(req, cfg, len(ids))
    return EngineRequest(request_id=uuid.uuid4().hex, prompt_ids=ids, sampling=sampling(req, cfg, max_tokens, stops),
                         speculative=speculative, spec=spec, logprobs=req.top_logprobs_k())
