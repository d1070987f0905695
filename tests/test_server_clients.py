"""What clients and careless or hostile requests meet: logit_bias honoured, odd values answered safely, bad input
refused with an OpenAI-shaped 4xx naming the problem, and the server alive and serving after each.
The real server with the bundled model on loopback, driven by the openai client and httpx."""
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from test_server import KEY, client, serving  # noqa: F401 -- client: the module's server's openai client

ORIGIN = "http://page.example"
http = httpx.Client(timeout=300)


@pytest.fixture(scope="module")
def server():
    yield from serving("--allowed-origins", ORIGIN, "--weight-dtype", "fp32")  # fp32: transformers' values


def auth(extra=None):
    return {"Authorization": f"Bearer {KEY}", **(extra or {})}


def refused(r, status, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and all(w in err["message"] for w in words), err
    return err


def alive(client):
    out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2, temperature=0,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert out.choices[0].message.content is not None


def first_token(client, **kw):
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=1, temperature=0,
                                    logprobs=1, **kw)
    return out.choices[0].logprobs.tokens[0], out.choices[0].logprobs.top_logprobs[0]


def token_id(server, text):
    r = http.post(server + "/tokenize", headers=auth(), json={"prompt": text, "add_special_tokens": False})
    ids = r.json()["tokens"]
    assert len(ids) == 1
    return ids[0]


def test_logit_bias_bans_and_forces_tokens(server, client):
    chosen, _ = first_token(client)
    banned, _ = first_token(client, logit_bias={str(token_id(server, chosen)): -100})
    assert banned != chosen
    forced_id = token_id(server, " banana")
    forced, _ = first_token(client, logit_bias={str(forced_id): 100})
    assert forced == " banana"
    chat = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "Name a fruit."}],
                                          logit_bias={str(forced_id): 100})
    assert chat.choices[0].message.content == " banana" * 3
    r = http.post(server + "/v1/completions", headers=auth(), json={"prompt": "x", "logit_bias": {"12": 101}})
    refused(r, 400, "logit_bias", "[-100, 100]")
    r = http.post(server + "/v1/completions", headers=auth(), json={"prompt": "x", "logit_bias": {"10000000": 1}})
    refused(r, 400, "logit_bias token id 10000000")


@pytest.mark.parametrize("seed", [2**64, 1e30, -2**70])
def test_seed_outside_64_bits_is_a_400_also_when_streaming(server, client, seed):
    for stream in (False, True):
        r = http.post(server + "/v1/chat/completions", headers=auth(),
                       json={"messages": [{"role": "user", "content": "hi"}], "seed": seed, "stream": stream})
        refused(r, 400, "seed")
    out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4, seed=2**64 - 1,
                                         messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].finish_reason == "length"


def test_extreme_sampling_values_fail_nobody(client):
    """Tiny temperatures are greedy; a tiny top_p keeps the top token; a tiny repetition penalty stays finite. Sent
    while three other clients stream, every request finishes and the streams are whole."""
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Count from one to ten."}]
    greedy = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    results, errors = {}, []

    def stream(i):
        try:
            s = client.chat.completions.create(model=model, messages=messages, max_tokens=24, stream=True, seed=i)
            parts = [c.choices[0].finish_reason for c in s if c.choices]
            results[i] = parts[-1]
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    odd = [{"temperature": 1e-300}, {"temperature": 1e-45}, {"top_p": 1e-300},
           {"repetition_penalty": 1e-300, "temperature": 0.7}, {"repetition_penalty": 1e-300, "temperature": 1e-300}]
    outs = [client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                           extra_body=kw if "repetition_penalty" in kw else None,
                                           **{k: v for k, v in kw.items() if k != "repetition_penalty"})
            for kw in odd]
    for t in threads:
        t.join(timeout=300)
    assert not errors and sorted(results) == [0, 1, 2] and set(results.values()) <= {"length", "stop"}
    assert outs[0].choices[0].message.content == outs[1].choices[0].message.content == \
        greedy.choices[0].message.content  # below 1e-5: greedy
    assert all(o.choices[0].finish_reason in ("length", "stop") for o in outs)


def test_bodies_and_headers_beyond_the_limits(server, client):
    # the test server's body limit is 1,000,000 bytes (MEGACTX_MAX_BODY_BYTES); chunked: no Content-Length
    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'
    start = time.monotonic()
    r = http.post(server + "/v1/completions", headers=auth({"Content-Type": "application/json"}), content=chunks())
    refused(r, 413, "exceeds the limit")
    assert time.monotonic() - start < 10
    r = http.post(server + "/v1/completions", headers=auth({"X-Junk": "x" * 100_000}), json={"prompt": "hi"})
    refused(r, 431, "headers")
    # text that cannot fit the context is refused before it is tokenized (4096 tokens x 32 characters)
    r = http.post(server + "/tokenize", headers=auth(), json={"prompt": "word " * 30000})
    refused(r, 400, "150000 characters", "shorten")
    alive(client)


def test_lone_surrogates_become_replacement_characters(server, client):
    body = '{"prompt": "Hello \\ud800 world", "max_tokens": 2, "temperature": 0}'
    r = http.post(server + "/v1/completions", headers=auth({"Content-Type": "application/json"}), content=body)
    assert r.status_code == 200, r.text
    chat = ('{"messages": [{"role": "user", "content": "Hi \\udfff"}], "max_tokens": 2, "temperature": 0}')
    r = http.post(server + "/v1/chat/completions", headers=auth({"Content-Type": "application/json"}), content=chat)
    assert r.status_code == 200, r.text
    r = http.post(server + "/tokenize", headers=auth({"Content-Type": "application/json"}),
                   content='{"prompt": "a\\ud800b", "add_special_tokens": false}')
    same = http.post(server + "/tokenize", headers=auth(), json={"prompt": "a\ufffdb", "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["tokens"] == same.json()["tokens"]


def test_image_parts_are_refused_by_name(server):
    r = http.post(server + "/v1/chat/completions", headers=auth(), json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    err = refused(r, 400, "this model takes text only", "'image_url'")
    assert err["param"].startswith("messages.0.content")


def test_browser_and_ops_conveniences(server, client):
    model = client.models.list().data[0].id
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = http.post(server + "/v1/completions", headers=auth({"X-Request-Id": "abc-123"}),
                   json={"prompt": "hi", "max_tokens": 1})
    assert r.headers["x-request-id"] == "abc-123"
    r = http.post(server + "/v1/completions", headers=auth(), json={"prompt": "hi", "max_tokens": 1})
    assert len(r.headers["x-request-id"]) == 32
    assert http.head(server + "/health").status_code == 200
    assert http.get(server + "/version").json()["version"]
    # CORS: the allowed origin's preflight and response; another origin gets no CORS header
    pre = http.options(server + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = http.get(server + "/v1/models", headers=auth({"Origin": ORIGIN}))
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = http.get(server + "/v1/models", headers=auth({"Origin": "http://other.example"}))
    assert "access-control-allow-origin" not in r.headers


def test_a_model_that_cannot_load_ends_the_server_with_code_2():
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "megactx.commands", "serve", "--port", "0", "--max-model-len", "4096",
                        "--kv-cache-memory", "8MiB"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.monotonic() - start < 120
    assert "KV cache memory" in r.stderr and "raise --kv-cache-memory" in r.stderr
    assert r.stderr.count("KV cache memory 8.0 MiB") == 1  # said once


def test_lm_eval_loglikelihood_request_gets_transformers_logprobs(server, hf_smollm2_dir):
    """lm-eval's local-completions loglikelihood request, as it sends it: token ids, echo, logprobs 1, max_tokens 1.
    Every prompt token's logprob (the first: null) equals transformers' log-softmax, then the generated token's."""
    import torch

    from conftest import hf_forward
    ids = http.post(server + "/tokenize", headers=auth(), json={"prompt": "The capital of France is Paris",
                                                               "add_special_tokens": False}).json()["tokens"]
    r = http.post(server + "/v1/completions", headers=auth(), json={
        "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    want = torch.log_softmax(hf_forward(hf_smollm2_dir, ids), -1)
    for p in range(1, len(ids)):
        assert lp["token_logprobs"][p] == pytest.approx(float(want[p - 1, ids[p]]), abs=2e-3)
        best = max(lp["top_logprobs"][p].values())
        assert best == pytest.approx(float(want[p - 1].max()), abs=2e-3)
    assert lp["token_logprobs"][-1] == pytest.approx(float(want[-1].max()), abs=2e-3)  # greedy generated token
    # max_tokens 0 with echo: the prompt's only; vLLM's prompt_logprobs with ranks; a stream is refused
    r = http.post(server + "/v1/completions", headers=auth(), json={
        "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0, "prompt_logprobs": 2})
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) and r.json()["usage"]["completion_tokens"] == 0
    entry = choice["prompt_logprobs"][1][str(ids[1])]
    assert entry["rank"] == int((want[0] > want[0, ids[1]]).sum()) + 1 and len(choice["prompt_logprobs"][1]) <= 3
    refused(http.post(server + "/v1/completions", headers=auth(), json={"prompt": ids, "max_tokens": 0}),
            400, "max_tokens 0")
    refused(http.post(server + "/v1/completions", headers=auth(), json={
        "prompt": ids, "echo": True, "logprobs": 1, "stream": True}), 400, "stream: false")
    chat = http.post(server + "/v1/chat/completions", headers=auth(), json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    info = http.get(server + "/tokenizer_info", headers=auth()).json()
    assert info["eos_token"] == "<|im_end|>" and "{%" in info["chat_template"]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
          "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0, "maximum": 10**9}}}


def test_response_format_json_schema_always_validates(client):
    model = client.models.list().data[0].id
    for seed in range(3):
        out = client.chat.completions.create(
            model=model, max_tokens=60, temperature=1.0, seed=seed,
            messages=[{"role": "user", "content": "Name a big city."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
        obj = json.loads(out.choices[0].message.content)
        assert set(obj) == {"city", "population"} and isinstance(obj["population"], int), obj
        assert isinstance(obj["city"], str) and len(obj["city"]) <= 20
        assert out.choices[0].finish_reason == "stop"


def test_guided_extras_on_both_endpoints(client):
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, max_tokens=10, temperature=1.0, seed=4,
                                          messages=[{"role": "user", "content": "Pick a colour."}],
                                          extra_body={"guided_choice": ["red", "green", "blue"]})
    assert chat.choices[0].message.content in ("red", "green", "blue")
    text = client.completions.create(model=model, prompt="My number is", max_tokens=12, temperature=1.0, seed=4,
                                     extra_body={"guided_regex": r" [0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", text.choices[0].text), text.choices[0].text
    obj = client.completions.create(model=model, prompt="JSON:", max_tokens=80, temperature=1.0, seed=4,
                                    extra_body={"guided_json": json.dumps(SCHEMA)})
    assert obj.choices[0].finish_reason == "stop"
    assert set(json.loads(obj.choices[0].text)) == {"city", "population"}


def test_constraints_refused_clearly(client):
    model = client.models.list().data[0].id
    ask = dict(model=model, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="Invalid type"):
        client.chat.completions.create(**ask, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "objectx"}}})
    with pytest.raises(openai.BadRequestError, match="json_schema.schema"):
        client.chat.completions.create(**ask, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(openai.BadRequestError, match="one output constraint"):
        client.chat.completions.create(**ask, response_format={"type": "json_object"},
                                       extra_body={"guided_regex": "a+"})
    with pytest.raises(openai.BadRequestError, match="no tool support"):  # SmolLM2's template renders no tools
        client.chat.completions.create(**ask, tools=[{"type": "function", "function": {"name": "f"}}])
    alive(client)


def test_unsupported_openai_fields_are_refused_by_name(server):
    cases = [("/v1/chat/completions", {"functions": [{"name": "f"}]}, "use tools"),
             ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "text only"),
             ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
             ("/v1/completions", {"suffix": "end"}, "suffix"),
             ("/v1/completions", {"best_of": 3}, "best_of")]
    for path, extra, words in cases:
        body = {"max_tokens": 2, **extra}
        body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"})
        refused(http.post(server + path, json=body, headers=auth()), 400, words)
    ok = {"user": "u1", "metadata": {"k": "v"}, "store": False, "modalities": ["text"], "best_of": 1}
    r = http.post(server + "/v1/chat/completions", json={"max_tokens": 2, "messages": [{"role": "user",
                                                                                         "content": "Hi"}], **ok},
                  headers=auth())
    assert r.status_code == 200, r.text
