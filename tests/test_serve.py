"""Ray Serve OpenAI server: real Serve, real HTTP on 127.0.0.1, the real ``openai`` client.

One module-scoped Serve application on tiny random models saved to a temp dir (a 4-layer verifier,
a drafter made of its first 3 layers, the tiny BPE tokenizer with a chat template), so replicas
load them by path in a second. Tests run in file order on purpose: the live-request checks come
before the load tests that make the autoscaler add a replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from bd_ray.testing.tiny import SERVE_MAX_MODEL_LEN, SERVE_PROMPTS as PROMPTS  # noqa: E402
from bd_ray.testing.ports import free_port as _free_port  # noqa: E402
from bd_ray.testing.tiny import serve_app_args as app_args  # noqa: E402

APP = "bd"
MAX_MODEL_LEN = SERVE_MAX_MODEL_LEN


@pytest.fixture(scope="module")
def server(serve_model_dirs):
    """Start Ray (4 logical CPUs) + Serve on 127.0.0.1 and the app; tear both down afterwards."""
    from bd_ray.serve.app import build_app

    # Fast autoscaling metrics for the autoscaling test (inherited by the cluster's processes).
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args(*serve_model_dirs)), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


def engine_stats() -> dict:
    return serve.get_deployment_handle("SpecEngine", APP).stats.remote().result(timeout_s=30)


def running_replicas(deployment: str = "SpecEngine") -> int:
    st = serve.status().applications[APP].deployments[deployment]
    return st.replica_states.get("RUNNING", 0)


def ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


# ---------------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-alias"]
    h = httpx.get(server + "/health", timeout=30).json()
    assert h["status"] == "ok" and h["engine"]["live_requests"] == 0
    assert h["engine"]["max_model_len"] == MAX_MODEL_LEN


@pytest.mark.parametrize("speculative", [True, False])
def test_completion_greedy_equals_ar(client, serve_reference, speculative):
    ar, tok = serve_reference
    prompt = PROMPTS[0]
    want = ar(ids(tok, prompt), 24)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"speculative": speculative})
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(ids(tok, prompt))
    assert r.usage.completion_tokens >= 1
    sm = r.model_extra["spec_metrics"]
    assert sm["speculative"] is speculative
    if speculative:
        assert sm["drafted"] > 0 and 0.0 <= sm["alpha"] <= 1.0 and sm["tau"] >= 1.0
        assert len(sm["per_position"]) == 3
        assert sm["adaptive"] is None
    else:
        assert sm["drafted"] == 0 and sm["tau"] == 1.0


def test_completion_stream_equals_ar_and_sse_format(server, client, serve_reference):
    ar, tok = serve_reference
    prompt = PROMPTS[1]
    want = ar(ids(tok, prompt), 30)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0,
                                            stream=True, extra_body={"gamma": 4, "kv_budget": 16,
                                                                     "sparse_policy": "streaming"}))
    assert "".join(c.choices[0].text for c in chunks) == want
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("length", "stop")
    assert last.usage.completion_tokens >= 1
    assert last.model_extra["spec_metrics"]["drafted"] > 0
    # raw SSE: every event is `data: {json}` and the stream ends with `data: [DONE]`
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        obj = json.loads(e.removeprefix("data: "))
        assert obj["object"] == "text_completion"


def test_chat_stream_and_not_equal_ar(client, serve_reference):
    ar, tok = serve_reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = ar(tok(rendered, add_special_tokens=False)["input_ids"], 20)
    r = client.chat.completions.create(model="tiny-alias", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.model_extra["spec_metrics"]["speculative"] is True
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def _status_and_error(fn):
    with pytest.raises(openai.APIStatusError) as ei:
        fn()
    return ei.value.status_code, ei.value.body


def test_bad_inputs_documented_errors(server, client, serve_reference):
    _, tok = serve_reference
    long_prompt = " ".join(["truth"] * 100)  # ~200 tokens
    n_long = len(ids(tok, long_prompt))
    cases = [
        # (kwargs, status, param, substring of the message)
        (dict(prompt=long_prompt, max_tokens=MAX_MODEL_LEN), 400, "max_tokens", str(MAX_MODEL_LEN)),
        (dict(prompt="hi", temperature=5), 400, "temperature", "temperature"),
        (dict(prompt="hi", n=17), 400, "n", "16"),
        (dict(prompt="hi", max_tokens=0), 400, "max_tokens", "max_tokens"),
        (dict(prompt="hi", extra_body={"gamma": 99}), 400, "gamma", "gamma"),
        (dict(prompt="hi", extra_body={"kv_budget": 0}), 400, "kv_budget", "kv_budget"),
        (dict(prompt=long_prompt, max_tokens=8, extra_body={"kv_budget": 4}), 400, "kv_budget", "minimum"),
        (dict(prompt="hi", extra_body={"sparse_policy": "nope"}), 400, "sparse_policy", "sparse_policy"),
        (dict(prompt="hi", extra_body={"frobnicate": 1}), 400, "frobnicate", "unknown field"),
        (dict(prompt="hi", logprobs=21), 400, "logprobs", "20"),
        (dict(prompt="hi", logprobs=2, echo=True), 400, "echo", "not supported"),
        (dict(prompt="hi", suffix="x"), 400, "suffix", "not supported"),
        (dict(prompt="hi", model="gpt-5"), 404, "model", "gpt-5"),
    ]
    assert n_long < MAX_MODEL_LEN
    for kwargs, status, param, text in cases:
        kwargs.setdefault("model", "tiny")
        code, body = _status_and_error(lambda: client.completions.create(**kwargs))
        assert code == status, (kwargs, body)
        err = body if "message" in body else body["error"]
        assert err["param"] == param, (kwargs, err)
        assert text in err["message"], (kwargs, err)
    # prompt alone beyond the limit, chat route
    code, body = _status_and_error(lambda: client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": " ".join(["truth"] * 600)}]))
    assert code == 400 and str(MAX_MODEL_LEN) in body["message"]
    # not JSON / wrong shape
    r = httpx.post(server + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # the server keeps serving
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert engine_stats()["live_requests"] == 0


def test_disconnect_mid_stream_frees_state(server):
    before = engine_stats()
    assert before["live_requests"] == 0
    body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True, "gamma": 1}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(2)]
            assert got[0].startswith("data: ")
            during = engine_stats()
            # leave without reading the rest: the connection is closed here
    assert during["live_requests"] == 1 and during["live"][0]["speculative"] is True
    deadline = time.time() + 30
    stats = engine_stats()
    while stats["live_requests"] and time.time() < deadline:
        time.sleep(0.2)
        stats = engine_stats()
    assert stats["live_requests"] == 0
    assert stats["totals"]["cancelled"] == before["totals"]["cancelled"] + 1


async def _one_stream(aclient, prompt, extra):
    stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                              stream=True, extra_body=extra)
    parts, last = [], None
    async for c in stream:
        parts.append(c.choices[0].text)
        last = c
    return "".join(parts), last.model_extra["spec_metrics"]


def test_eight_concurrent_streams_no_crosstalk(server, serve_reference):
    ar, tok = serve_reference
    configs = [
        {"gamma": 1, "kv_budget": 16, "sparse_policy": "streaming"},
        {"gamma": 2, "kv_budget": 24},
        {"gamma": 3, "kv_budget": "full"},
        {"gamma": 4, "kv_budget": 32, "sparse_policy": {"name": "snapkv", "window": 4, "sink": 2}},
        {"gamma": 5, "kv_budget": 48},
        {"gamma": 6, "kv_budget": 20, "sparse_policy": "streaming"},
        {"speculative": False},
        {"gamma": 8, "kv_budget": 64},
    ]
    prompts = [(PROMPTS[i % 4] + " ") * (1 + i % 3) for i in range(8)]
    wants = [ar(ids(tok, p), 40) for p in prompts]

    # 2 ongoing + 6 queued per replica hold all 8; should a 503 still happen, retry it as a client would.
    results = [None] * 8
    for _ in range(10):
        todo = [i for i in range(8) if results[i] is None]
        if not todo:
            break

        async def run_some(todo=todo):
            aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
            return await asyncio.gather(*(_one_stream(aclient, prompts[i], configs[i]) for i in todo),
                                        return_exceptions=True)

        for i, r in zip(todo, asyncio.run(run_some())):
            if isinstance(r, openai.APIStatusError) and r.status_code == 503:
                continue
            if isinstance(r, BaseException):
                raise r
            results[i] = r
        time.sleep(0.5)
    assert all(r is not None for r in results)
    for i, ((text, sm), want) in enumerate(zip(results, wants)):
        assert text == want, (i, configs[i])
        assert sm["speculative"] is (configs[i].get("speculative", True))


def test_overload_returns_503_with_retry_after_and_recovers(server, client):
    body = {"prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0, "gamma": 1}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(server + "/v1/completions", json=body) for _ in range(20)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["code"] == "overloaded"
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0)
    assert ok.choices[0].text is not None


def test_autoscaling_up_under_load_and_down_when_idle(server):
    # start from min_replicas
    deadline = time.time() + 60
    while running_replicas() > 1 and time.time() < deadline:
        time.sleep(0.5)
    assert running_replicas() == 1
    body = {"prompt": PROMPTS[2], "max_tokens": 60, "temperature": 0, "gamma": 2}
    stop = time.time() + 90
    peak = 1

    async def load():
        async with httpx.AsyncClient(timeout=120) as c:
            async def worker():
                while time.time() < stop and peak < 2:
                    await c.post(server + "/v1/completions", json=body)

            async def watch():
                nonlocal peak
                while time.time() < stop and peak < 2:
                    peak = max(peak, await asyncio.to_thread(running_replicas))
                    await asyncio.sleep(0.5)

            await asyncio.gather(watch(), *(worker() for _ in range(4)))

    asyncio.run(load())
    assert peak >= 2, "autoscaler never went above min_replicas under sustained load"
    deadline = time.time() + 90
    while running_replicas() > 1 and time.time() < deadline:
        time.sleep(0.5)
    assert running_replicas() == 1, "autoscaler did not scale back down when idle"
