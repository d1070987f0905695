"""An exception inside the engine: that request gets a 500 (or an SSE error event) and the server keeps serving.

The server, its engine and the bundled model are real; the fault is injected into one step of the model
runner, for requests whose prompt carries a marker, the way a kernel bug would surface.
"""
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from megactx.config import EngineConfig, SchedulerConfig
from megactx.server.app import create_app

MARKER = "Trigger an internal fault"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def faulty_server():
    app = create_app(EngineConfig(model=None, scheduler=SchedulerConfig(max_model_len=1024)), load_in_background=False)
    engine = app.state.megactx.engine.engine
    marker_ids = engine.tokenizer.encode(MARKER, add_special_tokens=False)
    real_forward = engine.runner.forward

    def forward(chunks):
        for ch in chunks:
            ids = ch.seq.prompt_token_ids
            if any(ids[i:i + len(marker_ids)] == marker_ids for i in range(len(ids))):
                raise RuntimeError("injected fault")
        return real_forward(chunks)
    engine.runner.forward = forward
    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield base
    server.should_exit = True
    thread.join(timeout=10)


def test_engine_exception_fails_the_request_with_500_and_serving_goes_on(faulty_server):
    client = openai.OpenAI(base_url=faulty_server + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=_model(client), prompt=MARKER + " now.", max_tokens=4)
    assert err.value.status_code == 500 and "injected fault" in str(err.value)
    stream = client.completions.create(model=_model(client), prompt=MARKER + " again.", max_tokens=4, stream=True)
    with pytest.raises(openai.APIError, match="injected fault"):
        list(stream)
    ok = client.completions.create(model=_model(client), prompt="The capital of France is", max_tokens=4)
    assert ok.choices[0].finish_reason == "length" and ok.usage.completion_tokens == 4
    assert httpx.get(faulty_server + "/health").status_code == 200


def _model(client) -> str:
    return client.models.list().data[0].id
