"""`megactx bench serve`: load a running OpenAI-compatible server (loopback only) and report latency percentiles.

Streams N chat requests with C in flight. TTFT: from sending to the first chunk carrying text (vLLM's rule);
inter-token latency: gaps between text chunks; throughput: generated tokens / wall time (prefills included);
decode rate: each stream's tokens after its first over the time from its first token to its last, times the
streams in flight (what the decode steps deliver, prefill excluded).
Optionally one long prompt (`--long-prompt-tokens`) is sent first, to measure the others' latency while it is
being prefilled.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from urllib.parse import urlparse

from megactx.errors import MegactxError

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def one_request(client, url, headers, body) -> dict:
    t0 = time.perf_counter()
    stamps, text, usage = [], "", None
    async with client.stream("POST", url, headers=headers, json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise MegactxError(f"server answered {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = (c.get("delta") or {}).get("content") or c.get("text") or ""
                if piece:
                    stamps.append(time.perf_counter())
                    text += piece
    tokens = usage["completion_tokens"] if usage else len(stamps)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "decode_rate": (tokens - 1) / span if span > 0 else float("nan"),
            "tokens": tokens, "latency": time.perf_counter() - t0}


async def run(args) -> dict:
    import httpx
    host = urlparse(args.base_url).hostname or ""
    if host not in LOOPBACK and not args.allow_remote:
        raise MegactxError(f"{args.base_url}: bench serve only targets loopback servers (127.0.0.1, localhost)")
    base = args.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient() as client:
        model = args.model or (await client.get(base + "/v1/models", headers=headers)).json()["data"][0]["id"]
        url = base + "/v1/chat/completions"

        def body(i: int, content: str | None = None, max_tokens: int | None = None) -> dict:
            return {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                    "ignore_eos": True, "max_tokens": max_tokens or args.max_tokens,
                    "messages": [{"role": "user", "content": content or f"Request {i}: tell a long story."}]}

        long_task = None
        if args.long_prompt_tokens:
            filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
            # sized with the server's own tokenizer, so that the prompt has about the tokens asked for
            r = await client.post(base + "/tokenize", headers=headers, json={"model": model, "prompt": filler * 8})
            per_filler = max(1, len(r.json()["tokens"]) // 8) if r.status_code == 200 else 20
            long_task = asyncio.create_task(one_request(
                client, url, headers, body(-1, filler * (args.long_prompt_tokens // per_filler), 1)))
            await asyncio.sleep(args.long_prompt_delay)
        sem = asyncio.Semaphore(args.concurrency)

        async def limited(i):
            async with sem:
                return await one_request(client, url, headers, body(i))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
        long_result = await long_task if long_task else None
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    report = {"concurrency": args.concurrency, "requests": args.requests, "max_tokens": args.max_tokens,
              "wall_s": wall, "output_tok_s": tokens / wall,
              "decode_tok_s": min(args.concurrency, args.requests) * statistics.fmean(r["decode_rate"] for r in results),
              "ttft_s": {p: pct(ttft, p) for p in (50, 90, 99)},
              "itl_ms": {p: 1000 * pct(itl, p) for p in (50, 90, 99)},
              "itl_mean_ms": 1000 * statistics.fmean(itl) if itl else float("nan")}
    if long_result:
        report["long_prompt_tokens"] = args.long_prompt_tokens
        report["long_prompt_ttft_s"] = long_result["ttft"]
    return report


def main(args) -> int:
    import httpx
    try:
        report = asyncio.run(run(args))
    except httpx.HTTPError as e:
        raise MegactxError(f"{args.base_url}: cannot reach the server ({e or type(e).__name__}); is it running?") from None
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"requests {report['requests']}, concurrency {report['concurrency']}, {report['max_tokens']} tokens each")
    print(f"throughput        {report['output_tok_s']:8.1f} output tokens/s ({report['wall_s']:.1f} s)")
    print(f"decode rate       {report['decode_tok_s']:8.1f} tokens/s (after each stream's first token)")
    t, i = report["ttft_s"], report["itl_ms"]
    print(f"TTFT (s)          p50 {t[50]:7.3f}  p90 {t[90]:7.3f}  p99 {t[99]:7.3f}")
    print(f"inter-token (ms)  p50 {i[50]:7.1f}  p90 {i[90]:7.1f}  p99 {i[99]:7.1f}")
    if "long_prompt_ttft_s" in report:
        print(f"long prompt       {report['long_prompt_tokens']} tokens, TTFT {report['long_prompt_ttft_s']:.1f} s")
    return 0
