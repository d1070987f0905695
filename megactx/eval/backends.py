"""Where an evaluation runs: this engine in-process, or any OpenAI-compatible server.

Both render a prompt the same way (as RULER evaluates chat models): the chat template wraps the task text as the
user turn, with the generation prompt, and an optional answer prefix is appended as raw text after the assistant header; the
result is token ids in the target's own tokenizer, so lengths are counted the way the model sees them.
A server is asked for its tokenizer and chat template through POST /tokenize and /detokenize (as vLLM and
megactx serve them) and the ids are sent to /v1/completions, so no local copy of the model is needed.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from megactx.errors import MegactxError

PREFILL_COMMENT = re.compile(r": prefill (\d+)/(\d+)")  # the server's progress lines (megactx/server/responses.py)


@dataclass(slots=True)
class Answer:
    text: str
    ttft_s: float  # from submitting the prompt to the first generated text
    prompt_tokens: int
    prefill_tok_s: float
    stats: dict = field(default_factory=dict)  # in-process: what sparse prefill did (SparseProbe.summary), peak RSS


Progress = Callable[[int, int], None]  # on_prefill(prompt tokens ready, prompt tokens) while a prompt is computed


class Backend(Protocol):
    name: str
    max_model_len: int | None  # prompt + generated tokens the target accepts (None: unknown)
    machine: dict  # what every result row records of where it ran: {"cpu", "dtype"} in-process, {} for a server

    def render(self, user_text: str, answer_prefix: str = "") -> list[int]: ...
    def count(self, user_text: str, answer_prefix: str = "") -> int: ...
    def generate(self, prompt_ids: list[int], max_tokens: int, on_prefill: Progress | None = None) -> Answer: ...


class InProcessBackend:
    """This engine, loaded in the evaluating process (greedy decoding)."""

    def __init__(self, llm):
        self.llm, self.tokenizer = llm, llm.tokenizer
        from megactx.loader import default_model_path
        self.name = os.path.basename((llm.engine.config.model or default_model_path()).rstrip("/"))
        from megactx.config.hardware import cpu_summary
        self.machine = {"cpu": cpu_summary(), "dtype": llm.engine.compute_dtype}  # recorded with every row
        self.max_model_len = llm.engine.max_model_len

    def render(self, user_text: str, answer_prefix: str = "") -> list[int]:
        return self.tokenizer.encode(self._template(user_text) + answer_prefix, add_special_tokens=False)

    def count(self, user_text: str, answer_prefix: str = "") -> int:
        return len(self.render(user_text, answer_prefix))

    def _template(self, user_text: str) -> str:
        messages = [{"role": "user", "content": user_text}]
        if not self.tokenizer.has_chat_template:
            return user_text
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def generate(self, prompt_ids: list[int], max_tokens: int, on_prefill: Progress | None = None) -> Answer:
        import resource
        from megactx.attention.sparse.probe import SparseProbe
        from megactx.sampling import SamplingParams
        start = time.perf_counter()

        def step(outputs):
            if on_prefill and outputs:
                on_prefill(outputs[0].metrics.get("prefill_done", 0), len(prompt_ids))
        # the engine's documented probe: this prompt's density and estimate time (a caller's own probe, e.g.
        # benchmarks/needle_recall.py's, keeps recording: the summary then covers its calls so far)
        outer = self.llm.engine.sparse_probe
        probe = outer or SparseProbe()
        self.llm.engine.observe_sparse(probe)
        try:
            out = self.llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                    on_step=step)[0]
        finally:
            self.llm.engine.observe_sparse(outer)
        m = out.metrics
        ttft = (m["first_token_time"] - m["arrival"]) if m.get("first_token_time") else time.perf_counter() - start
        # ru_maxrss: the process's high-water mark so far (KiB on Linux), this prompt's or an earlier one's
        stats = {**(probe.summary() if probe.calls else {}),
                 "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        return Answer(out.text, ttft, len(prompt_ids), len(prompt_ids) / max(ttft, 1e-9), stats)


class ServerBackend:
    """An OpenAI-compatible server: tokenizer and chat template through /tokenize, text via /v1/completions."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 7200):
        import httpx
        self.base = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        listing = self._get("/v1/models")["data"]
        entry = next((m for m in listing if m["id"] == model), listing[0])
        self.model = model or entry["id"]
        self.max_model_len = entry.get("max_model_len")  # vLLM and megactx report it
        self.name = f"{self.model} at {self.base}"
        self.machine: dict = {}  # the server's CPU is not known here

    def _get(self, path: str) -> dict:
        return self._check(self.client.get(self.base + path), path)

    def _post(self, path: str, body: dict) -> dict:
        return self._check(self.client.post(self.base + path, json=body), path)

    @staticmethod
    def _check(response, path: str) -> dict:
        if response.status_code != 200:
            raise MegactxError(f"{path}: the server answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def render(self, user_text: str, answer_prefix: str = "") -> list[int]:
        ids = self._post("/tokenize", {"model": self.model, "add_generation_prompt": True,
                                       "messages": [{"role": "user", "content": user_text}]})["tokens"]
        if not answer_prefix:
            return ids
        text = self._post("/detokenize", {"model": self.model, "tokens": ids})["prompt"] + answer_prefix
        return self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})["tokens"]

    def count(self, user_text: str, answer_prefix: str = "") -> int:
        return len(self.render(user_text, answer_prefix))

    def generate(self, prompt_ids: list[int], max_tokens: int, on_prefill: Progress | None = None) -> Answer:
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True}
        start, first, text = time.perf_counter(), None, ""
        with self.client.stream("POST", self.base + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise MegactxError(f"/v1/completions: the server answered {r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                progress = PREFILL_COMMENT.match(line)
                if progress and on_prefill:
                    on_prefill(int(progress[1]), int(progress[2]))
                if not line.startswith("data: {"):
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    piece = choice.get("text") or ""
                    if piece and first is None:
                        first = time.perf_counter()
                    text += piece
        ttft = (first or time.perf_counter()) - start
        return Answer(text, ttft, len(prompt_ids), len(prompt_ids) / max(ttft, 1e-9))


def open_backend(base_url: str | None = None, api_key: str | None = None, served_model: str | None = None,
                 config=None) -> Backend:
    """A server at base_url (with api_key, served_model), else the engine `config` (an EngineConfig) in-process."""
    if base_url:
        return ServerBackend(base_url, api_key=api_key, model=served_model)
    from megactx.llm import LLM
    return InProcessBackend(LLM(config=config))
