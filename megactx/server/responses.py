"""OpenAI response shapes: chat.completion(.chunk), text_completion, usage, logprobs, SSE framing.

Prefill progress: before the first token of a streamed response the server sends SSE comment lines
`: prefill <ready>/<prompt tokens> (<cached> cached) <rate> tok/s, ETA <seconds> s` (the parts in brackets
when known), which SSE clients (the openai package included) ignore.
"""
from __future__ import annotations

import json
import time

from megactx.outputs import CompletionOutput, RequestOutput, prefill_rate
from megactx.server.tool_calls import parse_tool_calls


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def prefill_comment(out: RequestOutput) -> str:
    """`: prefill DONE/TOTAL (CACHED cached) RATE tok/s, ETA S s`: prompt tokens ready, of which taken from the
    prefix cache, and the speed of the computed part with the time left once two steps have run."""
    cached = f" ({out.usage.cached_tokens} cached)" if out.usage.cached_tokens else ""
    rate = prefill_rate(out)
    speed = f" {rate[0]:.0f} tok/s, ETA {rate[1]:.0f} s" if rate else ""
    return f": prefill {out.metrics.get('prefill_done', 0)}/{len(out.prompt_token_ids)}{cached}{speed}\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, c: CompletionOutput, start: int, end: int) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for t in c.logprobs[start:end]:
        e = _entry(tokenizer, t.token_id, t.logprob)
        e["top_logprobs"] = [_entry(tokenizer, i, lp) for i, lp in (t.top_logprobs or [])]
        content.append(e)
    return {"content": content}


def completion_logprobs(tokenizer, c: CompletionOutput, start: int, end: int, offset: int) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for t in c.logprobs[start:end]:
        text = tokenizer.decode([t.token_id], skip_special_tokens=False)
        tokens.append(text)
        lps.append(t.logprob)
        tops.append({tokenizer.decode([i], skip_special_tokens=False): lp for i, lp in (t.top_logprobs or [])})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _join(prompt: dict, generated: dict | None) -> dict:
    """The echoed prompt's logprobs followed by the generated tokens' (their offsets after the prompt text)."""
    if generated is None:
        return prompt
    return {key: prompt[key] + generated[key] for key in prompt}


def echo_logprobs(tokenizer, out: RequestOutput, k: int) -> dict:
    """The prompt's part of an echoed completion's logprobs (OpenAI's legacy shape; the first token: null)."""
    tokens, lps, tops, offsets, offset = [], [], [], [], 0
    for token_id, e in zip(out.prompt_token_ids, out.prompt_logprobs):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        tokens.append(text)
        lps.append(None if e is None else e.logprob)
        tops.append(None if e is None else
                    {tokenizer.decode([i], skip_special_tokens=False): lp for i, lp in e.top_logprobs[:k]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(tokenizer, out: RequestOutput, k: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token {token id: {logprob, rank, decoded_token}} of the token itself and
    the top k (the first token: null)."""
    result = []
    for token_id, e in zip(out.prompt_token_ids, out.prompt_logprobs):
        if e is None:
            result.append(None)
            continue
        entry = {}
        for rank, (i, lp) in enumerate(e.top_logprobs[:k], start=1):
            entry[str(i)] = {"logprob": lp, "rank": rank, "decoded_token": tokenizer.decode([i], skip_special_tokens=False)}
        entry[str(token_id)] = {"logprob": e.logprob, "rank": e.rank,
                                "decoded_token": tokenizer.decode([token_id], skip_special_tokens=False)}
        result.append(entry)
    return result


class ResponseBuilder:
    """Builds the bodies for one request (chat or text completion), whole or as stream chunks."""

    def __init__(self, kind: str, model: str, tokenizer, request_id: str, tools: bool = False):
        """tools: the request offered tools; the model's tool-call blocks become `tool_calls`."""
        self.kind, self.model, self.tokenizer, self.id, self.tools = kind, model, tokenizer, request_id, tools
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, outs: list[RequestOutput], n: int, echo_texts: list[str] | None = None,
             echo_k: int | None = None, prompt_k: int | None = None) -> dict:
        """echo_k: the echoed prompt's logprobs come first in each choice's logprobs (top echo_k); prompt_k: vLLM's
        prompt_logprobs field (per choice of a completion, once per response of a chat)."""
        choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
        for p, out in enumerate(outs):
            prompt_tokens += out.usage.prompt_tokens
            completion_tokens += out.usage.completion_tokens
            cached += out.usage.cached_tokens
            for c in out.outputs:
                index = p * n + c.index
                if self.kind == "chat":
                    message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
                    if self.tools:
                        content, calls = parse_tool_calls(c.text)
                        if calls:
                            message = {"role": "assistant", "content": content, "tool_calls": calls}
                            finish = "tool_calls" if finish == "stop" else finish
                    choices.append({"index": index, "message": message,
                                    "logprobs": chat_logprobs(self.tokenizer, c, 0, len(c.token_ids)),
                                    "finish_reason": finish})
                else:
                    prefix = echo_texts[p] if echo_texts else ""
                    logprobs = completion_logprobs(self.tokenizer, c, 0, len(c.token_ids), len(prefix))
                    if echo_k is not None:
                        logprobs = _join(echo_logprobs(self.tokenizer, out, echo_k), logprobs)
                    choices.append({"index": index, "text": prefix + c.text, "finish_reason": c.finish_reason,
                                    "logprobs": logprobs})
                    if prompt_k is not None:
                        choices[-1]["prompt_logprobs"] = vllm_prompt_logprobs(self.tokenizer, out, prompt_k)
        body = self._base("chat.completion" if self.kind == "chat" else "text_completion")
        body["choices"] = choices
        if prompt_k is not None and self.kind == "chat":
            body["prompt_logprobs"] = vllm_prompt_logprobs(self.tokenizer, outs[0], prompt_k)
        body["usage"] = usage_dict(prompt_tokens, completion_tokens, cached)
        return body

    def chunk(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None,
              role: bool = False, tool_calls: list[dict] | None = None) -> str:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            if tool_calls:  # OpenAI's stream shape: each call with its index, whole here (sent once parsed)
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._base("text_completion")
        body["choices"] = [choice]
        return sse(body)

    def usage_chunk(self, out: RequestOutput) -> str:
        body = self._base("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        body["usage"] = usage_dict(out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.cached_tokens)
        return sse(body)

    def logprobs_for(self, c: CompletionOutput, start: int, end: int, offset: int) -> dict | None:
        if self.kind == "chat":
            return chat_logprobs(self.tokenizer, c, start, end)
        return completion_logprobs(self.tokenizer, c, start, end, offset)


def error_body(message: str, status: int, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
