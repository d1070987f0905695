"""Offline pattern search and long-sequence refinement: what `megactx sparse search` writes (MInference).

search: one dense prefill of a calibration document (the ppl document: the standard library's source, or
--text) captures every layer's keys and its last `rows` queries. Per layer, each candidate pattern is planned
exactly as the prefill would plan it (estimated from the last last_q queries, block-granular kernel plan) and
scored by attention recall: the softmax mass of the full attention that its mask keeps, mean over the rows.
Each head takes the cheapest candidate (lowest density) whose recall reaches --target, else the best recall.
Layers are written to the JSON as they finish; a rerun skips the layers already there.

refine (the Qwen2.5-1M report's Algorithm 1): prefill a long document with the current budgets and sparse
prefill on, compute for every piece the dense attention too, recall = exp(lse_sparse - lse_full) per head
(mean over rows); heads below --threshold get `step` more verticals and slashes. Each pass is written out;
--passes repeats with the raised budgets.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable

import torch

from megactx.errors import MegactxError
from megactx.attention.sparse.estimate import VerticalSlash, estimate_vertical_slash
from megactx.attention.sparse.patterns import HeadPattern, dump_layers, parse_layers
from megactx.attention.sparse.plan import block_sparse_plan, plan_mask, vertical_slash_plan
from megactx.attention.sparse.probe import SparseProbe

logger = logging.getLogger(__name__)

CANDIDATES = [HeadPattern("vertical_and_slash", 30, 800), HeadPattern("vertical_and_slash", 100, 750),
              HeadPattern("vertical_and_slash", 500, 700), HeadPattern("vertical_and_slash", 3500, 100),
              HeadPattern("a_shape", 100, 800), HeadPattern("block_sparse", 100, 0)]


def capture(llm, ids: list[int], rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Dense prefill of ids; per layer the rotated queries of the last `rows` tokens [rows, H, D] and all keys
    [Hkv, m, D] (fp32), read in the prefill's last chunk."""
    from megactx import SamplingParams
    backend = llm.engine.runner.backend
    if getattr(backend, "rotates_queries", False) or backend.sparse is not None:
        raise MegactxError("sparse search captures dense attention: run it without --dca and with --no-sparse "
                           "(at most the trained length)")
    queries, keys = {}, {}
    dense = backend.attend_sequence
    m = len(ids)

    def hook(layer, s, q, k_new, v_new):
        if s.num_computed + s.num_new == m:
            queries.setdefault(layer, []).append(q[-rows:].float().clone())
            keys[layer] = backend.cache.read(layer, s.key_slots, torch.float32)[0].clone()
        return dense(layer, s, q, k_new, v_new)

    backend.attend_sequence = hook
    try:
        llm.generate(ids, SamplingParams(temperature=0, max_tokens=1))
    finally:
        backend.attend_sequence = dense
    n_layers = llm.engine.model_config.num_hidden_layers
    return [torch.cat(queries[li])[-rows:] for li in range(n_layers)], [keys[li] for li in range(n_layers)]


def candidate_masks(q: torch.Tensor, k: torch.Tensor, last_q: int, block: int,
                    candidates: list[HeadPattern]) -> list[torch.Tensor]:
    """q: [R, H, D] the last R rotated queries, k: [Hkv, m, D] -> per candidate a [H, R, m] mask (all heads)."""
    r, h, _ = q.shape
    m = k.shape[1]
    q_start = m - r
    scale = q.shape[-1] ** -0.5
    masks = []
    for cand in candidates:
        if cand.kind == "vertical_and_slash":
            vs = estimate_vertical_slash(q[-last_q:], k, torch.arange(m - last_q, m), scale,
                                         cand.vertical_size, cand.slash_size)
            plan = vertical_slash_plan(vs, q_start, r, block)
        elif cand.kind == "a_shape":
            vs = VerticalSlash(torch.arange(min(cand.vertical_size, m)).expand(h, -1),
                               torch.arange(min(cand.slash_size, m)).expand(h, -1))
            plan = vertical_slash_plan(vs, q_start, r, block)
        else:
            plan = block_sparse_plan(q, k, q_start, block, torch.full((h,), cand.vertical_size))
        masks.append(plan_mask(plan, q_start, r, block, m))
    return masks


def search_layer(q: torch.Tensor, k: torch.Tensor, last_q: int, block: int, target: float,
                 candidates: list[HeadPattern] = CANDIDATES) -> tuple[dict[int, HeadPattern], dict[int, float]]:
    """Per head: the cheapest candidate whose recall reaches target, else the best; -> (patterns, recalls)."""
    r, h, d = q.shape
    hkv, m, _ = k.shape
    qg = q.view(r, hkv, h // hkv, d)
    scores = torch.einsum("rkgd,kmd->kgrm", qg, k).reshape(h, r, m) * d ** -0.5
    scores.masked_fill_(torch.arange(m)[None, :] > torch.arange(m - r, m)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [H, R, m]
    del scores
    causal = (torch.arange(m)[None, :] <= torch.arange(m - r, m)[:, None]).sum()
    results = []  # per candidate: recall [H], density [H]
    for mask in candidate_masks(q, k, last_q, block, candidates):
        recall = (probs * mask).sum(-1).mean(-1)
        density = mask.sum((1, 2)).float() / causal
        results.append((recall, density))
    chosen, recalls = {}, {}
    for head in range(h):
        ok = [(float(den[head]), i) for i, (rec, den) in enumerate(results) if float(rec[head]) >= target]
        i = min(ok)[1] if ok else max(range(len(results)), key=lambda j: float(results[j][0][head]))
        chosen[head], recalls[head] = candidates[i], round(float(results[i][0][head]), 4)
    return chosen, recalls


def run_search(llm, ids: list[int], out: str, rows: int = 256, last_q: int = 64, block: int = 256,
               target: float = 0.95, on_layer: Callable[[int], None] | None = None) -> list[dict[int, HeadPattern]]:
    done, scores = [], []
    if os.path.exists(out):
        with open(out) as f:
            data = json.load(f)
        done = parse_layers(data, out)
        scores = [{int(h): e[3] for h, e in layer.items()} for layer in data]
        logger.info("%s: %d layers already searched", out, len(done))
    n_layers = llm.engine.model_config.num_hidden_layers
    if len(done) >= n_layers:
        return done
    queries, keys = capture(llm, ids, min(rows, len(ids) - last_q))
    for li in range(len(done), n_layers):
        patterns, recalls = search_layer(queries[li], keys[li], last_q, block, target)
        done.append(patterns)
        scores.append(recalls)
        _write(out, done, scores)
        if on_layer:
            on_layer(li)
    return done


def run_refine(make_llm, ids: list[int], config_in: str | None, out: str, threshold: float, step: int = 2048,
               passes: int = 1, on_pass: Callable[[int, int], None] | None = None) -> list[dict[int, HeadPattern]]:
    """make_llm(config_path) builds an engine with sparse prefill from that config (DCA as the user chose)."""
    from megactx import SamplingParams
    current = config_in
    layers = None
    for p in range(passes):
        llm = make_llm(current)
        sparse = llm.engine.runner.backend.sparse
        n_layers, n_heads = llm.engine.model_config.num_hidden_layers, llm.engine.model_config.num_attention_heads
        layers = [dict(enumerate(sparse.patterns[li])) for li in range(n_layers)]
        probe = SparseProbe(dense_layers=None)  # every piece of every layer also densely: recall per head
        llm.engine.observe_sparse(probe)
        llm.generate(ids, SamplingParams(temperature=0, max_tokens=1))
        raised = 0
        scores = []
        for li in range(n_layers):
            recall = probe.recall(li)
            scores.append({h: round(float(recall[h]), 4) if recall is not None else 0.0 for h in range(n_heads)})
            for h in range(n_heads):
                pat = layers[li][h]
                if recall is not None and recall[h] < threshold:
                    layers[li][h] = HeadPattern("vertical_and_slash", pat.vertical_size + step, pat.slash_size + step)
                    raised += 1
        _write(out, layers, scores)
        logger.info("refine pass %d: %d heads below recall %.3f raised by %d", p + 1, raised, threshold, step)
        if on_pass:
            on_pass(p, raised)
        current = out
        del llm
        if raised == 0:
            break
    return layers


def _write(out: str, layers, scores) -> None:
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dump_layers(layers, scores), f, indent=1)
    os.replace(tmp, out)
