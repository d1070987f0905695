"""Where a needle is lost: the attention on the needle and the sparse plans' coverage of it, layer by layer, for
the question's rows.

For each needle task sample (RULER's and ours, megactx/eval/ruler_tasks.py) at a length, one greedy run with the
given settings. The engine's sparse probe (megactx/attention/sparse/probe.py) records every plan; for the query
block that holds the prompt's last row (the row whose output picks the first answer token), the script reports per
layer the share of heads whose plan keeps at least half of the needle sentence's tokens (with --sparse-dense-tail
0: the default tail computes those rows densely, and the row shows the answer only). A dense run has no plans.
Every run also records, through the attention probe (megactx/attention/attention_probe.py), the prompt's last row's
attention mass on the needle's tokens per layer (the heads' mean and the best head), as the engine's attention
defines it: DCA's parts and temperature included. Rows are appended to --out as they finish (a rerun skips them).

  python benchmarks/needle_recall.py --model EVAL.gguf --tasks niah_single_2,niah_similar --lengths 49152 \
      --samples 3 --setting dca-sparse --out benchmarks/results/needle_recall.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megactx import LLM  # noqa: E402
from megactx.attention.attention_probe import AttentionProbe  # noqa: E402
from megactx.attention.sparse.probe import SparseProbe  # noqa: E402
from megactx.config.hardware import cpu_summary  # noqa: E402
from megactx.eval.backends import InProcessBackend  # noqa: E402
from megactx.eval.ruler import build_sample, parse_tasks  # noqa: E402
from megactx.eval.ruler_tasks import ALL_TASKS, NEEDLE  # noqa: E402
from megactx.eval.scoring import METRICS, postprocess  # noqa: E402

SETTINGS = {  # name -> engine settings; "plain": no DCA (in range only)
    "plain": {"dca": False, "sparse": False},
    "dca-dense": {"dca": True, "sparse": False},
    "dca-sparse": {"dca": True, "sparse": True},
}


def needle_tokens(tokenizer, text: str, needle: str) -> list[int]:
    """Token positions of the needle sentence in the rendered prompt text."""
    start = text.find(needle)
    if start < 0:
        return []
    enc = tokenizer.hf(text, return_offsets_mapping=True, add_special_tokens=False)
    end = start + len(needle)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]


def plan_coverage(probe: SparseProbe, prompt_len: int, positions: list[int]) -> dict[int, float]:
    """Per layer: the share of heads whose last query block keeps >= half of `positions` among its earlier keys
    (positions inside the block itself are always computed)."""
    wanted = set(positions)
    out: dict[int, float] = {}
    for call in probe.calls:
        if call.plan is None or call.q_start + call.rows != prompt_len:
            continue
        block_start = call.q_start + (len(call.plan[0]) - 1) * call.block
        own = {p for p in wanted if p >= block_start}
        kept = sum(len((set(head[-1].indices().tolist()) | own) & wanted) * 2 >= len(wanted) for head in call.plan)
        out[call.layer] = kept / len(call.plan)
    return out


def needle_block_plans(probe: SparseProbe, needles: dict[str, list[int]]) -> list[dict]:
    """For each needle (name -> token positions) and layer: each head's kept key ranges for the query block that
    holds the needle's first token (the block's own keys are computed anyway)."""
    out = []
    for call in probe.calls:
        if call.plan is None:
            continue
        for name, positions in needles.items():
            if not positions or not call.q_start <= positions[0] < call.q_start + call.rows:
                continue
            k = (positions[0] - call.q_start) // call.block
            out.append({"needle": name, "layer": call.layer, "block_start": call.q_start + k * call.block,
                        "ranges": [head[k].ranges for head in call.plan]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", default="needles")
    ap.add_argument("--lengths", default="49152")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--indices", default=None, help="only these samples, a comma list (default: the first --samples)")
    ap.add_argument("--setting", choices=list(SETTINGS), default="dca-sparse")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--sparse-threshold", type=int, default=32768)
    ap.add_argument("--dca-original-max-position", type=int, default=None,
                    help="pretend a shorter trained length (a cheap stand-in for DCA far beyond it)")
    ap.add_argument("--dca-local-size", type=int, default=None, help="default: the model's or the engine's")
    ap.add_argument("--sparse-dense-tail", type=int, default=None, help="default: the engine's")
    ap.add_argument("--dca-temperature", default=None, help="default: the engine's")
    ap.add_argument("--sparse-mass", type=float, default=None, help="the pooled cut-off (default: the engine's)")
    ap.add_argument("--out", default="benchmarks/results/needle_recall.jsonl")
    ap.add_argument("--plans-out", default=None, help="also write, per needle and layer, every head's kept key "
                                                      "ranges for the query block holding the needle (JSON lines)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["task"], r["length"], r["index"], r["setting"], r["dtype"], r.get("dense_tail"),
                     r.get("dca_temperature"), r.get("dca_local_size"), r.get("sparse_mass"))
                    for r in map(json.loads, f) if not r.get("sparse_dense_layers")}
    settings = dict(SETTINGS[args.setting])
    if settings["dca"] and args.dca_original_max_position:
        settings["dca_original_max_position"] = args.dca_original_max_position
    if settings["dca"] and args.dca_local_size:
        settings["dca_local_size"] = args.dca_local_size
    if settings["dca"] and args.dca_temperature:
        settings["dca_temperature"] = args.dca_temperature
    if settings["sparse"] and args.sparse_mass is not None:
        settings["sparse_mass"] = args.sparse_mass
    if settings["sparse"] and args.sparse_dense_tail is not None:
        settings["sparse_dense_tail"] = args.sparse_dense_tail
    llm = LLM(args.model, max_model_len=max(lengths) + 256, max_num_seqs=1, dtype=args.dtype,
              sparse_threshold=args.sparse_threshold, allow_long_context=not settings["dca"], **settings)
    backend = InProcessBackend(llm)
    tail = llm.engine.config.sparse.dense_tail if settings["sparse"] else None
    temperature = llm.engine.dca.temperature if llm.engine.dca else None
    local_size = llm.engine.dca.local_size if llm.engine.dca else None
    mass = args.sparse_mass if settings["sparse"] else None  # None: the engine's cut-off
    indices = [int(x) for x in args.indices.split(",")] if args.indices else range(args.samples)
    sizes: dict = {}
    for length in lengths:
        for name in parse_tasks(args.tasks):
            task = ALL_TASKS[name]
            for index in indices:
                if (name, length, index, args.setting, args.dtype, tail, temperature, local_size, mass) in done:
                    continue
                sample, ids = build_sample(backend, task, length, index, 0, sizes)
                text = backend._template(sample.text) + sample.answer_prefix
                every = [part for line in text.split("\n") for part in line.split(". ")
                         if part.startswith(NEEDLE.split("{")[0])]
                needles = [n for n in every if any(v in n for v in sample.outputs)]  # the answer's needles
                positions = sorted({p for n in needles for p in needle_tokens(llm.tokenizer, text, n)})
                others = [(n, needle_tokens(llm.tokenizer, text, n)) for n in every if n not in needles]
                probe = SparseProbe(record_plans=True)
                llm.engine.observe_sparse(probe)
                attention = AttentionProbe(positions, keep_probs=bool(others))
                llm.engine.observe_attention(attention)
                answer = backend.generate(ids, task.tokens_to_generate)
                llm.engine.observe_sparse(None)
                llm.engine.observe_attention(None)
                prediction = postprocess(answer.text)
                row = {"task": name, "length": length, "index": index, "setting": args.setting, "dtype": args.dtype,
                       "dense_tail": tail, "prompt_tokens": len(ids), "score": METRICS[task.metric]([prediction], [sample.outputs]),
                       "prediction": prediction[:200], "outputs": sample.outputs, "ttft_s": round(answer.ttft_s, 1),
                       "needle_tokens": len(positions), "cpu": cpu_summary(),
                       "dca_original_max_position": args.dca_original_max_position, "dca_temperature": temperature,
                       "dca_local_size": local_size, "sparse_mass": mass,
                       "needle_mass": [round(x, 4) for x in attention.per_layer()],
                       "needle_mass_best_head": [round(float(attention.mass[la].max()), 4)
                                                 for la in sorted(attention.mass)],
                       # the other needles (distractors: other keys' values), each: its first token and mass by layer
                       "other_needles": [{"position": pos[0], "text": n[:80],
                                          "mass": [round(float(attention.probs[la][:, pos].sum(-1).mean()), 4)
                                                   for la in sorted(attention.probs)]}
                                         for n, pos in others if pos],
                       "plan_coverage": plan_coverage(probe, len(ids), positions) if positions else {}}
                print(json.dumps({k: row[k] for k in ("task", "length", "index", "setting", "dca_temperature", "score",
                                                      "prediction", "needle_mass")}))
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if args.plans_out:
                    named = {"asked": positions, **{n[:80]: pos for n, pos in others if pos}}
                    with open(args.plans_out, "a") as f:
                        for plan in needle_block_plans(probe, named):
                            f.write(json.dumps({"task": name, "length": length, "index": index, **plan}) + "\n")


if __name__ == "__main__":
    main()
