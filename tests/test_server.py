"""The OpenAI-compatible server on a tiny random model, driven by the official `openai` client and raw HTTP."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from serving_tiny import MAX_LEN, tiny_engine, tiny_tokenizer

from treespec.engine.async_engine import AsyncEngine
from treespec.server.app import ServerSettings, create_app
from treespec.server.background import BackgroundServer
from treespec.server.protocol import MAX_STOP

MODEL = "tiny"
SPEC = {"method": "ngram", "budget": 6}
PROMPTS = ["the quick brown fox", "hello world", "a server streams tokens", "speculative decoding"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    engine = AsyncEngine(tiny_engine(tok, spec=SPEC, max_num_seqs=16))
    with BackgroundServer(create_app(engine, tok, model_name=MODEL)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- the openai client ------------------------------------------------------------------------------------------
def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").json() == {"status": "ok"}


def test_completion_usage_and_speculation_stats(client):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0] * 3, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 10
    assert out.usage.total_tokens == out.usage.prompt_tokens + 10
    spec = out.usage.model_extra["speculation"]
    assert spec["num_steps"] >= 1 and spec["num_draft_tokens"] > 0  # the repeated prompt gives n-gram drafts
    assert spec["num_accepted_tokens"] == sum(spec["accepted_per_position"])
    assert spec["num_steps"] + spec["num_accepted_tokens"] >= 10  # a step emits accepted + 1 (capped by max_tokens)


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


@pytest.mark.parametrize("speculate", [True, False])
def test_streaming_equals_non_streaming(client, speculate):
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True, "speculate": speculate})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert [t for c in chunks if c.choices for t in ids_of(c.choices[0])] == ids_of(full.choices[0])
    if not speculate:  # one token per step on both sides, so the text arrives in the same pieces
        assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_speculation_off_gives_the_same_tokens(client):
    kw = dict(model=MODEL, prompt=PROMPTS[0] * 3, max_tokens=12, temperature=0)
    on = client.completions.create(**kw, extra_body={"ignore_eos": True, "return_token_ids": True})
    off = client.completions.create(**kw, extra_body={"ignore_eos": True, "speculate": False,
                                                      "return_token_ids": True})
    assert ids_of(off.choices[0]) == ids_of(on.choices[0])
    assert on.usage.model_extra["speculation"]["num_draft_tokens"] > 0
    assert off.usage.model_extra["speculation"]["num_draft_tokens"] == 0


def test_chat_and_chat_streaming(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[2]}]
    extra = {"ignore_eos": True, "return_token_ids": True}
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                          extra_body=extra)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8,
                                                 temperature=0, stream=True, extra_body=extra))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [t for c in chunks for t in c.choices[0].model_extra.get("token_ids", [])] == ids_of(full.choices[0])
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_and_stop_string(client):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, temperature=1.0, seed=5, n=3,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2] and out.usage.completion_tokens == 18
    extra = {"ignore_eos": True, "speculate": False}  # one token per step: the same text pieces twice
    base = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0,
                                     extra_body=extra).choices[0].text
    stop = base[5:7]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[stop],
                                    extra_body=extra)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == base[:base.index(stop)]


def test_stop_token_ids_and_every_sampling_parameter(client):
    extra = {"ignore_eos": True, "return_token_ids": True}
    base = ids_of(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                            extra_body=extra).choices[0])
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                    extra_body={**extra, "stop_token_ids": [base[3]]})
    assert cut.choices[0].finish_reason == "stop"
    assert ids_of(cut.choices[0]) == base[:base.index(base[3]) + 1]  # the stop token is included in the ids
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], n=2, seed=3,
        max_completion_tokens=5, temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
        stop=["zz"], extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 10


def test_raw_sse_format(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


# ---- bad input -----------------------------------------------------------------------------------------------
GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
BAD_INPUTS = [
    # (name, path, body, status, param)
    ("max_tokens 0", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {**GOOD, "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens string", "/v1/completions", {**GOOD, "max_tokens": "4"}, 400, "max_tokens"),
    ("max_tokens float", "/v1/completions", {**GOOD, "max_tokens": 4.5}, 400, "max_tokens"),
    ("max_tokens bool", "/v1/completions", {**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ("n 0", "/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("n huge", "/v1/completions", {**GOOD, "n": 10**9}, 400, "n"),
    ("temperature negative", "/v1/completions", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("temperature string", "/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("top_p 0", "/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("top_p above 1", "/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("top_k below -1", "/v1/completions", {**GOOD, "top_k": -2}, 400, "top_k"),
    ("min_p above 1", "/v1/completions", {**GOOD, "min_p": 2}, 400, "min_p"),
    ("presence_penalty range", "/v1/completions", {**GOOD, "presence_penalty": 3}, 400, "presence_penalty"),
    ("repetition_penalty 0", "/v1/completions", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("seed negative", "/v1/completions", {**GOOD, "seed": -1}, 400, "seed"),
    ("unknown model", "/v1/completions", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("prompt + max_tokens over context", "/v1/completions", {**GOOD, "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("prompt missing", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("prompt empty", "/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {**GOOD, "prompt": {"a": 1}}, 400, "prompt"),
    ("token id outside vocab", "/v1/completions", {**GOOD, "prompt": [1, 10**6]}, 400, "prompt"),
    ("batched prompts", "/v1/completions", {**GOOD, "prompt": ["a", "b"]}, 400, "prompt"),
    ("too many stop strings", "/v1/completions", {**GOOD, "stop": [f"s{i}" for i in range(MAX_STOP + 1)]}, 400,
     "stop"),
    ("empty stop string", "/v1/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("logprobs", "/v1/completions", {**GOOD, "logprobs": 2}, 400, "logprobs"),
    ("unknown field", "/v1/completions", {**GOOD, "frobnicate": 1}, 400, "frobnicate"),
    ("stream_options without stream", "/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("messages empty", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("message bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages"),
    ("chat max_completion_tokens 0", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("chat unknown model", "/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model"),
    ("body not an object", "/v1/completions", [1, 2], 400, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_answers_error_shape(http, name, path, body, status, param):
    assert_error(http.post(path, json=body), status, param)


def test_malformed_oversized_and_wrong_routes(http):
    assert_error(http.post("/v1/completions", content=b"{not json"), 400)
    assert_error(http.post("/v1/completions", content=b""), 400)
    assert_error(http.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}'), 400, "temperature")
    big = json.dumps({**GOOD, "prompt": "x" * (2 << 20)}).encode()
    assert_error(http.post("/v1/completions", content=big), 400)
    assert_error(http.get("/v1/nope"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_good_request_after_bad_ones(client, http):
    for _, path, body, _, _ in BAD_INPUTS:
        http.post(path, json=body)
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5


# ---- load and robustness --------------------------------------------------------------------------------------
def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.num_unfinished == 0 and engine.snapshot.num_running == 0 and engine.snapshot.num_waiting == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.snapshot}")


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Make each engine step take >= 5 ms, so 200-token requests are still running when the test acts."""
    runner = server.engine.engine.runner
    real_forward = runner.forward

    def slow(prefills, trees):
        time.sleep(0.005)
        return real_forward(prefills, trees)
    monkeypatch.setattr(runner, "forward", slow)


def test_cancellation_storm_then_prompt_request(server, client, http, slow_steps):
    async def cut_stream(c: httpx.AsyncClient, i: int) -> None:
        body = {**GOOD, "prompt": f"{PROMPTS[i % 4]} {i}", "max_tokens": 200, "ignore_eos": True, "stream": True}
        async def read() -> None:
            async with c.stream("POST", "/v1/completions", json=body) as resp:
                async for _ in resp.aiter_bytes():
                    pass
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(read(), timeout=0.5)

    async def storm() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=30) as c:
            await asyncio.gather(*(cut_stream(c, i) for i in range(50)))
    before = http.get("/metrics").text
    asyncio.run(storm())
    wait_idle(server.engine)  # every cut request was aborted and its slot freed
    aborted = metric(http.get("/metrics").text, "treespec:request_success_total", finished_reason="abort")
    assert aborted - metric(before, "treespec:request_success_total", finished_reason="abort") == 50
    t0 = time.monotonic()
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8 and time.monotonic() - t0 < 5.0


def test_non_streaming_client_disconnect_aborts(server, http, slow_steps):
    before = metric(http.get("/metrics").text, "treespec:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json={**GOOD, "max_tokens": 200, "ignore_eos": True},
                   timeout=0.3)
    wait_idle(server.engine, timeout=2.0)  # 200 slow steps would take > 1 s: it was aborted
    after = metric(http.get("/metrics").text, "treespec:request_success_total", finished_reason="abort")
    assert after - before == 1


def test_64_concurrent_streams_complete_unmixed(server, client):
    prompts = [f"{PROMPTS[i % 4]} number {i}" for i in range(64)]
    max_tokens = 8
    extra = {"ignore_eos": True, "return_token_ids": True}
    alone = [ids_of(client.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0,
                                              extra_body=extra).choices[0]) for p in prompts[:8]]

    async def one(aclient: openai.AsyncOpenAI, p: str) -> tuple[list[int], int, str]:
        stream = await aclient.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body=extra)
        tokens, usage, ids = [], None, set()
        async for chunk in stream:
            ids.add(chunk.id)
            tokens.extend(t for c in chunk.choices for t in ids_of(c))
            usage = chunk.usage or usage
        assert len(ids) == 1  # every chunk of a stream carries that stream's id
        return tokens, usage.completion_tokens, ids.pop()

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))
    results = asyncio.run(main())
    assert [n for _, n, _ in results] == [max_tokens] * 64
    assert [len(t) for t, _, _ in results] == [max_tokens] * 64
    assert len({rid for _, _, rid in results}) == 64
    assert [t for t, _, _ in results[:8]] == alone  # batched greedy == alone: nothing lost or mixed


def test_engine_failure_fails_only_that_request(server, client, http, monkeypatch):
    runner = server.engine.engine.runner
    real_forward = runner.forward

    def poisoned(prefills, trees):  # fails any step that carries the poison prompt
        if any(w.request.prompt_ids[:3] == [7, 7, 7] for w in trees):
            raise RuntimeError("poisoned")
        return real_forward(prefills, trees)
    monkeypatch.setattr(runner, "forward", poisoned)
    # speculate off: LLMEngine keeps a failed step's draft batch for the next commit (reported to the engine)
    body = {**GOOD, "prompt": [7, 7, 7, 7], "ignore_eos": True, "speculate": False}
    err = assert_error(http.post("/v1/completions", json=body), 500)
    assert "poisoned" in err["message"]
    events = sse_events(http.post("/v1/completions", json={**body, "stream": True}).text)
    assert "poisoned" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4


def metric(text: str, name: str, **labels) -> float:
    want = {"model_name": MODEL, **labels}
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        got = dict(kv.split("=", 1) for kv in head[head.find("{") + 1:-1].split(",")) if "{" in head else {}
        if all(got.get(k) == f'"{v}"' for k, v in want.items()):
            total += float(value)
    return total


def test_metrics_counters_move(server, client, http):
    wait_idle(server.engine)
    before = http.get("/metrics").text
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0] * 3, max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = http.get("/metrics").text
    spec = out.usage.model_extra["speculation"]

    def moved(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)
    assert moved("treespec:prompt_tokens_total") == out.usage.prompt_tokens
    assert moved("treespec:generation_tokens_total") == 20
    assert moved("treespec:spec_decode_num_draft_tokens_total") == spec["num_draft_tokens"] > 0
    assert moved("treespec:spec_decode_num_accepted_tokens_total") == spec["num_accepted_tokens"]
    assert moved("treespec:spec_decode_num_accepted_tokens_per_pos_total") == spec["num_accepted_tokens"]
    assert moved("treespec:spec_decode_num_drafts_total") >= 1
    assert moved("treespec:request_success_total", finished_reason="length") == 1
    assert moved("treespec:time_to_first_token_seconds_count") == 1
    assert moved("treespec:e2e_request_latency_seconds_count") == 1
    # one latency per token after the first step's tokens (that step may also carry accepted drafts)
    assert 20 - moved("treespec:inter_token_latency_seconds_count") in range(1, SPEC["budget"] + 2)
    assert metric(after, "treespec:num_requests_running") == 0


def test_queue_full_answers_429(tok, monkeypatch):
    engine = AsyncEngine(tiny_engine(tok, max_num_seqs=1, max_waiting=1))
    real_forward = engine.engine.runner.forward
    monkeypatch.setattr(engine.engine.runner, "forward", lambda *a: time.sleep(0.005) or real_forward(*a))
    with BackgroundServer(create_app(engine, tok, model_name=MODEL)) as srv, \
            httpx.Client(base_url=srv.base_url, timeout=30) as http:
        body = {**GOOD, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # (keep the iterator: dropping it closes the connection)
            next(lines)  # the first request is running
            with http.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200
                err = assert_error(http.post("/v1/completions", json=GOOD), 429)
                assert err["type"] == "rate_limit_error"
        wait_idle(engine)
        assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_api_key_guards_everything_but_health(tok):
    engine = AsyncEngine(tiny_engine(tok))
    settings = ServerSettings(model_name=MODEL, api_key="s3cret")
    with BackgroundServer(create_app(engine, tok, settings=settings)) as srv, \
            httpx.Client(base_url=srv.base_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/v1/nope"):
            assert_error(http.get(path), 401)
            assert_error(http.get(path, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(http.post("/v1/completions", json=GOOD), 401)
        good = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        bad = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert "access-control-allow-origin" not in http.get("/health", headers={"Origin": "http://x"}).headers


def test_health_is_503_while_loading():
    with BackgroundServer(create_app(None, None, model_name=MODEL)) as srv, \
            httpx.Client(base_url=srv.base_url, timeout=30) as http:
        assert http.get("/health").status_code == 503
        assert_error(http.post("/v1/completions", json=GOOD), 503)


def test_cors_only_when_asked(tok):
    settings = ServerSettings(model_name=MODEL, api_key="k", cors_origins=["http://ok.example"])
    with BackgroundServer(create_app(AsyncEngine(tiny_engine(tok)), tok, settings=settings)) as srv, \
            httpx.Client(base_url=srv.base_url, timeout=30) as http:
        preflight = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"}
        resp = http.options("/v1/completions", headers=preflight)  # preflights carry no key
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "http://ok.example"
        other = http.options("/v1/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
