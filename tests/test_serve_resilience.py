"""Unit tests of the ingress's replica-death handling (no cluster): ``ResilientCall`` restarts a
request from its prompt on a replica failure and resumes a stream only when the regenerated prefix
equals what was sent; anything else is a clear ``ReplicaDiedError``, never spliced text.
(The same on a real cluster, with a SIGKILLed replica: tests/test_faults_serve.py.)"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorDiedError, ActorUnavailableError  # noqa: E402

from bd_ray.config import SamplingConfig, SpecConfig  # noqa: E402
from bd_ray.serve import resilience as dep  # noqa: E402
from bd_ray.serve.protocol import EngineRequest, max_request_bytes  # noqa: E402

REQ = EngineRequest(request_id="x", prompt_ids=[1, 2], sampling=SamplingConfig(), speculative=True, spec=SpecConfig())


class FakeGen:
    """A streaming handle call: yields ``events``, then raises ``die`` (if any)."""

    def __init__(self, events, die=None):
        self.events, self.die, self.cancelled = list(events), die, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.events:
            return self.events.pop(0)
        if self.die is not None:
            raise self.die
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class FakeEngine:
    """``engine.options(stream=True).generate.remote(request)`` hands out the scripted calls in order."""

    def __init__(self, *calls):
        self.calls, self.payloads = list(calls), []

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, payload):
        self.payloads.append(payload)
        return self.calls.pop(0)


def chunk(ids, text):
    return {"type": "chunk", "token_ids": ids, "text": text, "replica_id": "r"}


def final(ids, text):
    return {"type": "final", "token_ids": ids, "text": text, "result": {}, "spec_metrics": {"drafted": 0},
            "replica_id": "r"}


def drain(call):
    async def go():
        out = []
        async for ev in call:
            out.append(ev)
        return out

    return asyncio.run(go())


FULL = [chunk([1, 2], "ab"), chunk([3], "c"), chunk([4, 5], "de"), final([6], "f")]


def test_stream_resumed_identically_after_replica_death():
    engine = FakeEngine(FakeGen(FULL[:2], die=ActorDiedError()), FakeGen(FULL))
    evs = drain(dep.ResilientCall(engine, REQ, reproducible=True, discard=False))
    assert "".join(e["text"] for e in evs) == "abcdef"
    assert [t for e in evs for t in e["token_ids"]] == [1, 2, 3, 4, 5, 6]
    assert evs[-1]["spec_metrics"]["replica_restarts"] == 1
    assert [p.engine_id for p in engine.payloads] == ["x", "x-r1"]
    # different chunking of the regenerated prefix (e.g. another gamma) is fine
    engine = FakeEngine(FakeGen(FULL[:2], die=ActorUnavailableError("gone", None)),
                        FakeGen([chunk([1], "a"), chunk([2, 3, 4], "bcd"), chunk([5], "e"), final([6], "f")]))
    evs = drain(dep.ResilientCall(engine, REQ, reproducible=True, discard=False))
    assert "".join(e["text"] for e in evs) == "abcdef"


def test_divergent_or_unreproducible_stream_is_a_clear_error():
    engine = FakeEngine(FakeGen(FULL[:2], die=ActorDiedError()),
                        FakeGen([chunk([1, 2], "ab"), chunk([9], "z"), final([6], "f")]))
    call = dep.ResilientCall(engine, REQ, reproducible=True, discard=False)
    with pytest.raises(dep.ReplicaDiedError, match="diverged"):
        drain(call)
    engine = FakeEngine(FakeGen(FULL[:2], die=ActorDiedError()), FakeGen(FULL))
    with pytest.raises(dep.ReplicaDiedError, match="after 3 tokens were streamed.*Retry the request"):
        drain(dep.ResilientCall(engine, REQ, reproducible=False, discard=False))
    # restarts are bounded
    engine = FakeEngine(*[FakeGen([], die=ActorDiedError()) for _ in range(dep.MAX_REPLICA_RESTARTS + 1)])
    with pytest.raises(dep.ReplicaDiedError, match="restarts"):
        drain(dep.ResilientCall(engine, REQ, reproducible=True, discard=False))


def test_unsent_output_is_restarted_and_request_errors_pass_through():
    # nothing streamed yet: restarted silently even when sampling without a seed
    engine = FakeEngine(FakeGen([], die=ActorDiedError()), FakeGen(FULL))
    evs = drain(dep.ResilientCall(engine, REQ, reproducible=False, discard=False))
    assert "".join(e["text"] for e in evs) == "abcdef"
    # non-streaming response: the collector is told to drop what it gathered
    engine = FakeEngine(FakeGen(FULL[:2], die=ActorDiedError()), FakeGen(FULL))
    evs = drain(dep.ResilientCall(engine, REQ, reproducible=False, discard=True))
    kinds = [e["type"] for e in evs]
    assert kinds == ["chunk", "chunk", "reset", "chunk", "chunk", "chunk", "final"]
    # an error that is not a replica failure is not retried
    engine = FakeEngine(FakeGen(FULL[:1], die=ValueError("bad")), FakeGen(FULL))
    with pytest.raises(ValueError):
        drain(dep.ResilientCall(engine, REQ, reproducible=True, discard=False))
    assert dep.is_replica_failure(RuntimeError("wrapped")) is False
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = ActorDiedError()
    assert dep.is_replica_failure(wrapped)


def test_body_limit_scales_with_context():
    assert max_request_bytes(None) == max_request_bytes(256) == 1 << 20
    assert max_request_bytes(131072) == 64 * 131072
