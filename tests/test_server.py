"""The real server on loopback with the bundled model, driven by the openai client (no mocks)."""
import json
import re
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*extra: str, max_body_bytes: int = 1_000_000) -> tuple[subprocess.Popen, str]:
    """`megactx serve` on a free loopback port, once /health answers."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", MEGACTX_MAX_BODY_BYTES=str(max_body_bytes))
    proc = subprocess.Popen([sys.executable, "-m", "megactx.commands", "serve", "--port", str(port), "--api-key", KEY,
                             "--max-model-len", "4096", "--max-num-batched-tokens", "512", "--max-num-seqs", "8", "--dtype", "fp32",
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not become ready")
    return proc, base


def serving(*extra: str):
    """A module fixture's body: the server with these flags for the module's tests, stopped after them."""
    proc, base = start_server(*extra)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    yield from serving()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def auth():
    return {"Authorization": f"Bearer {KEY}"}


Q = [{"role": "user", "content": "What is the capital of France?"}]


def metric(server, name) -> float:
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise KeyError(name)


def test_chat_usage_counts_equal_the_tokenizer(server, client, model):
    r = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    tok = httpx.post(server + "/tokenize", json={"messages": Q}, headers=auth()).json()
    assert r.usage.prompt_tokens == tok["count"]
    completion_ids = httpx.post(server + "/tokenize", headers=auth(), json={
        "prompt": r.choices[0].message.content, "add_special_tokens": False}).json()["tokens"]
    assert r.usage.completion_tokens == len(completion_ids) + 1  # + the end-of-turn token
    text = httpx.post(server + "/detokenize", json={"tokens": tok["tokens"]}, headers=auth()).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n")


def test_streaming_reassembles_to_the_whole_response(client, model):
    whole = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=30, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    comp = client.completions.create(model=model, prompt="The sky is", temperature=0, max_tokens=12)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The sky is", temperature=0, max_tokens=12, stream=True))
    assert streamed == comp.choices[0].text


def test_stop_seed_n_logprobs_and_assistant_prefill(client, model):
    base = client.completions.create(model=model, prompt="The sky is", temperature=0, max_tokens=16).choices[0].text
    stop = base[5:9]
    r = client.completions.create(model=model, prompt="The sky is", temperature=0, max_tokens=16, stop=[stop])
    assert r.choices[0].text == base[:base.find(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model=model, messages=Q, temperature=1.0, max_tokens=12, seed=7, n=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2 and a.choices[0].message.content != a.choices[1].message.content
    lp = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=5, logprobs=True,
                                        top_logprobs=3).choices[0].logprobs.content
    assert len(lp) == 5 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
    assert all(t.token == t.top_logprobs[0].token for t in lp)  # greedy picks the most likely
    prefill = client.chat.completions.create(
        model=model, temperature=0, max_tokens=5,
        messages=Q + [{"role": "assistant", "content": "The capital of France is"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert prefill.choices[0].message.content.strip().startswith("Paris")


def test_errors_have_openai_shape_and_status(server, client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hello " * 100, max_tokens=4090)
    assert "4096" in str(e.value) and "4090" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=Q)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers=auth() | {
        "content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server + "/v1/chat/completions", json={"messages": Q, "temperature": "hot"}, headers=auth())
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/chat/completions", json={"messages": Q, "top_p": 7}, headers=auth())
    assert r.status_code == 400
    r = httpx.post(server + "/v1/completions", json={"prompt": "x" * 2_000_000}, headers=auth())
    assert r.status_code == 413
    assert httpx.get(server + "/health").status_code == 200  # still serving


def test_disconnect_mid_stream_frees_the_sequence(server, client, model):
    stream = client.chat.completions.create(model=model, messages=Q, max_tokens=3000, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert metric(server, "megactx_num_requests_running") == 1
    stream.close()
    deadline = time.time() + 30
    while metric(server, "megactx_num_requests_running") != 0 and time.time() < deadline:
        time.sleep(0.2)
    assert metric(server, "megactx_num_requests_running") == 0
    assert metric(server, "megactx_kv_cache_usage_ratio") == 0


def test_eight_concurrent_streams_each_get_their_own_text(client, model):
    """Greedy text under batching equals the text alone, except where the alone run stood at a near-tie:
    a batched matmul rounds differently from a single row, which can flip an argmax between two tokens whose
    log-probabilities are within rounding of each other -- and nowhere else."""
    prompts = [f"Write a short sentence about the number {i}." for i in range(8)]

    def tokens_of(choice):
        return [(t.token, {c.token: c.logprob for c in t.top_logprobs}) for t in choice.logprobs.content]

    alone = [tokens_of(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=16, logprobs=True,
        top_logprobs=2).choices[0]) for p in prompts]
    got = [None] * 8

    def run(i):
        s = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                           temperature=0, max_tokens=16, stream=True, logprobs=True)
        got[i] = [t.token for c in s if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    same = 0
    for want, have in zip(alone, got):
        assert have, "a stream returned no tokens"
        diverge = next((j for j, (w, h) in enumerate(zip(want, have)) if w[0] != h), None)
        if diverge is None:
            same += len(want) == len(have)  # else one ended (EOS) where the other went on
            continue
        chosen, top = want[diverge]
        assert have[diverge] in top, f"token {diverge}: {have[diverge]!r} is not a runner-up of {chosen!r}"
        assert top[chosen] - top[have[diverge]] < 0.05, f"token {diverge}: {top} is no near-tie"
    assert same >= 6


def test_prefill_progress_before_the_first_token(server, model):
    prompt = "The grass is green. The sky is blue. " * 200  # ~1,800 tokens, 512 per step
    computed_before = metric(server, "megactx_prompt_tokens_computed")
    lines = []
    with httpx.stream("POST", server + "/v1/completions", headers=auth(), timeout=300,
                      json={"model": model, "prompt": prompt, "max_tokens": 2, "stream": True}) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
    progress = [tuple(map(int, l.split()[2].split("/"))) for l in lines if l.startswith(": prefill")]
    total = progress[0][1]
    assert len(progress) >= 3 and [p for p, _ in progress] == sorted(p for p, _ in progress)
    assert progress[0][0] == 512 and progress[-1][0] < total
    # from the second line on: the speed and the time left, consistent with each other
    speeds = [re.search(r"(\d+) tok/s, ETA (\d+) s$", l) for l in lines if l.startswith(": prefill")]
    assert speeds[0] is None and all(speeds[1:])
    for (done, _), m in zip(progress[1:], speeds[1:]):
        assert int(m[1]) > 0 and abs(int(m[2]) - (total - done) / int(m[1])) <= 1
    assert metric(server, "megactx_prompt_tokens_computed") - computed_before == total  # every token computed once
    assert lines[-1] == "data: [DONE]"
    data = [json.loads(l[6:]) for l in lines if l.startswith("data: {")]
    assert data[-1]["choices"][0]["finish_reason"] == "length"


def test_second_question_on_a_document_is_served_from_the_prefix_cache(server, client, model):
    """Two questions about one document: the second computes only what differs, says so in its usage, its
    progress lines and /metrics, and answers as the first did to the same prompt."""
    doc = "Notes of the expedition. " + " ".join(f"Day {i}: we walked {i % 7 + 3} miles north." for i in range(120))
    ask = [{"role": "user", "content": doc + "\nHow far did we walk on day 5?"}]
    first = client.chat.completions.create(model=model, messages=ask, max_tokens=12, temperature=0)
    computed = metric(server, "megactx_prompt_tokens_computed")
    cached = metric(server, "megactx_prompt_tokens_cached")
    lines = []
    with httpx.stream("POST", server + "/v1/chat/completions", headers=auth(), timeout=300,
                      json={"model": model, "messages": ask, "max_tokens": 12, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        lines = [line for line in r.iter_lines() if line]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    usage = data[-1]["usage"]
    total = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert usage["prompt_tokens"] == total and usage["prompt_tokens_details"]["cached_tokens"] >= total - 128
    assert metric(server, "megactx_prompt_tokens_cached") - cached == usage["prompt_tokens_details"]["cached_tokens"]
    assert metric(server, "megactx_prompt_tokens_computed") - computed == total - usage["prompt_tokens_details"][
        "cached_tokens"]
    assert any(re.match(r": prefill \d+/\d+ \(\d+ cached\)", line) for line in lines)
    assert metric(server, "megactx_prefix_cache_hit_rate") > 0
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in data if d["choices"])
    assert text == first.choices[0].message.content


def test_a_restarted_server_takes_the_document_from_its_disk_cache(tmp_path):
    doc = "Ledger of the harbour. " + " ".join(f"Ship {i} brought {i % 9 + 2} crates of tea." for i in range(90))
    ask = [{"role": "user", "content": doc + "\nHow many crates did ship 4 bring?"}]
    answers = []
    for run in range(2):
        proc, base = start_server("--kv-cache-dir", str(tmp_path))
        try:
            client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
            r = client.chat.completions.create(model=client.models.list().data[0].id, messages=ask, max_tokens=10,
                                               temperature=0)
            answers.append((r.usage, r.choices[0].message.content, metric(base, "megactx_kv_cache_disk_blocks_read")))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    (first, text1, read1), (second, text2, read2) = answers
    assert first.prompt_tokens_details.cached_tokens == 0 and read1 == 0
    assert second.prompt_tokens_details.cached_tokens == (second.prompt_tokens - 1) // 128 * 128 > 0
    assert read2 == second.prompt_tokens_details.cached_tokens // 128
    assert text1 == text2


def test_passkey_eval_end_to_end_against_the_server(server, tmp_path):
    from megactx.commands import main
    from megactx.eval.results import read_rows
    computed_before = metric(server, "megactx_prompt_tokens_computed")
    rc = main(["eval", "passkey", "--base-url", server, "--api-key", KEY, "--lengths", "512", "--depths", "0,50",
               "--out", str(tmp_path)])
    assert rc == 0
    rows = read_rows(str(tmp_path / "passkey.jsonl"))
    assert [(r["length"], r["depth"]) for r in rows] == [(512, 0), (512, 50)]
    assert all(507 <= r["prompt_tokens"] <= 512 for r in rows)  # sized with the server's own tokenizer
    assert all(r["correct"] for r in rows), rows  # the bundled model finds the key at 512 tokens, depths 0 and 50
    # the server really computed both prompts
    assert metric(server, "megactx_prompt_tokens_computed") - computed_before >= sum(r["prompt_tokens"] for r in rows)
    assert (tmp_path / "passkey_heatmap.png").stat().st_size > 1000
    # one more cell into the same folder: the summary file covers all three, not only the new one
    assert main(["eval", "passkey", "--base-url", server, "--api-key", KEY, "--lengths", "512", "--depths", "100",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "passkey_summary.json").read_text())["summary"]
    assert [(t["length"], t["cells"]) for t in summary] == [(512, 3)]
    assert len(read_rows(str(tmp_path / "passkey.jsonl"))) == 3


def test_ruler_against_the_server_renders_like_the_engine_and_scores(server, tmp_path):
    from megactx.eval import ruler
    from megactx.eval.backends import ServerBackend
    from megactx.loader import default_model_path
    from megactx.loader.tokenizer import load_tokenizer
    backend = ServerBackend(server, api_key=KEY)
    assert backend.max_model_len == 4096
    tok = load_tokenizer(default_model_path())
    text, prefix = "Find the number.\nThe number is 7.", " The number is"
    local = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]) + prefix, add_special_tokens=False)
    assert backend.render(text, prefix) == local  # chat template on the client side, the answer prefix appended
    rows = ruler.run_ruler(backend, ["niah_single_1"], [1024], 1, str(tmp_path))
    assert len(rows) == 1 and rows[0]["prompt_tokens"] + 128 <= 1024
    assert rows[0]["score"] in (0.0, 100.0) and rows[0]["prediction"]
