"""`megactx serve --tensor-parallel-size 2` (or --context-parallel-size 2) on one machine: the server starts its
second rank itself, answers as one process does (greedy), and ends with exit code 2 and the reason when that rank
dies, instead of hanging."""
import os
import signal
import time

import openai
import pytest

from megactx import LLM, SamplingParams
from test_server import KEY, start_server


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


@pytest.mark.parametrize("flags,kind", [(["--tensor-parallel-size", "2"], "tensor-parallel"),
                                        (["--context-parallel-size", "2"], "context-parallel")])
def test_two_ranks_serve_like_one_and_a_lost_rank_ends_the_server(tiny_dir, flags, kind):
    path = tiny_dir("qwen2")
    proc, base = start_server("--model", path, *flags, "--threads", "1",
                              "--served-model-name", "m", "--max-model-len", "512", "--dist-timeout", "20")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        out = client.completions.create(model="m", prompt="The quick brown fox", max_tokens=12, temperature=0)
        one = LLM(path, dtype="fp32", max_model_len=512).generate(
            ["The quick brown fox"], SamplingParams(max_tokens=12, temperature=0.0))[0]
        assert out.choices[0].text == one.outputs[0].text and out.usage.completion_tokens == 12
        rank1 = [c for c in children(proc.pid) if "spawn_main" in cmdline(c)]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(openai.APIError):
            client.completions.create(model="m", prompt="Hello", max_tokens=4, temperature=0)
        assert proc.wait(timeout=60) == 2 and time.monotonic() - start < 60
        assert f"{kind} group lost" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
