"""Is a needle lost beyond the trained length lost by DCA, or by the model at that distance? The same sample inside
the trained length, with every kept needle at its true distance from the question.

For each needle task sample at --length (the harness's own sample, megactx/eval/ruler.py), the script cuts the
head of the haystack, at a sentence or line boundary, until the prompt fits the trained length: the instruction,
the question and everything after the cut are the same text, so each needle left sits as many tokens before the
question as in the long prompt (to within the tokens of the seam). Needles in the cut part are gone, and the row
names them. The cut prompt runs with plain RoPE and dense attention (the trained model, no DCA, no sparse), and
the row records the answer beside each needle's distance. A miss here is the model's, at those distances; a miss
only in the long prompt is what DCA's folded positions add.

With --fold-local-size N every needle of the long prompt, the cut ones too, is moved to where DCA with that local
size shows it to the question: the distance between the last query's rotated position (intra, successive or
inter-chunk) and the needle's (its position modulo the chunk length). The prompt then shows the needles at DCA's
distances and everything else at its own: a miss there is the trained model's answer to the needles where the
fold puts them.

  python benchmarks/needle_in_range.py --model EVAL.gguf --tasks niah_multikey_1 --length 49152 --indices 0,2 \
      --out benchmarks/results/needle_in_range.jsonl
  python benchmarks/needle_in_range.py --model EVAL.gguf --length 65536 --indices 0 --fold-local-size 16384
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megactx import LLM  # noqa: E402
from megactx.attention.dca_distances import apparent_distances  # noqa: E402
from megactx.config import DCAConfig  # noqa: E402
from megactx.config.hardware import cpu_summary  # noqa: E402
from megactx.eval.backends import InProcessBackend  # noqa: E402
from megactx.eval.ruler import build_sample, other_needles, parse_tasks  # noqa: E402
from megactx.eval.ruler_tasks import ALL_TASKS, NEEDLE, Sample  # noqa: E402
from megactx.eval.scoring import METRICS, postprocess  # noqa: E402

NEEDLE_START = NEEDLE.split("{")[0]
NEEDLE_SENTENCE = re.compile(re.escape(NEEDLE_START) + r"[^\n]*?: (\S+)\.(?=\s|$)")


def token_distances(backend: InProcessBackend, sample: Sample, chars: list[int]) -> list[int]:
    """Tokens from the token holding each character of sample.text to the end of the rendered prompt."""
    text = backend._template(sample.text) + sample.answer_prefix
    base = text.index(sample.text)
    offsets = backend.llm.tokenizer.hf(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    ends = [b for _, b in offsets]
    return [len(ends) - next(i for i, b in enumerate(ends) if b > base + c) for c in chars]


def needle_distances(backend: InProcessBackend, sample: Sample) -> dict[str, int]:
    """Each needle sentence's value -> tokens from its first token to the end of the rendered prompt."""
    found = list(NEEDLE_SENTENCE.finditer(sample.text))
    return dict(zip((m.group(1) for m in found), token_distances(backend, sample, [m.start() for m in found])))


def shown_distances(distances: dict[str, int], length: int, cfg: DCAConfig) -> dict[str, int]:
    """value -> tokens before the end (the key's own token included, as needle_distances counts) -> where DCA shows
    each of them to the last query of a `length`-token prompt."""
    shown = apparent_distances(length - 1, cfg)
    return {v: int(shown[length - d]) + 1 for v, d in distances.items()}


def fold_in(backend: InProcessBackend, short: Sample, long: Sample, targets: dict[str, int]) -> Sample:
    """short without its needle sentences, then with each needle sentence of `long` (value -> target distance)
    inserted at the sentence boundary nearest that many tokens before the end. Nearest first: an insertion moves
    only what lies before it."""
    sentences = {m.group(1): m.group(0) for m in NEEDLE_SENTENCE.finditer(long.text)}
    text = NEEDLE_SENTENCE.sub("", short.text).replace("  ", " ")
    short = Sample(text, short.answer_prefix, short.outputs, short.others)
    head = short.text.index("\n") + 1
    for value, target in sorted(targets.items(), key=lambda kv: kv[1]):
        bounds = [head + m.end() for m in re.finditer(r"(?<=\.) ", short.text[head:])]
        size = len(backend.tokenizer.encode(sentences[value] + " ", add_special_tokens=False))
        # a needle inserted at a boundary D tokens back starts D + its own size back
        at = min(zip(token_distances(backend, short, bounds), bounds), key=lambda db: abs(db[0] + size - target))[1]
        short = Sample(short.text[:at] + sentences[value] + " " + short.text[at:], short.answer_prefix,
                       short.outputs, short.others)
    return short


def cut_head(backend: InProcessBackend, sample: Sample, budget: int) -> Sample:
    """The sample with the fewest leading haystack sentences or lines removed that fits `budget` tokens."""
    head = sample.text.index("\n") + 1  # the instruction line ends before the haystack
    bounds = [m.end() for m in re.finditer(r"(?<=\.) |\n", sample.text[head:])]

    def cut(i: int) -> Sample:
        text = sample.text[:head] + sample.text[head + bounds[i]:]
        return Sample(text, sample.answer_prefix, sample.outputs, sample.others)

    lo, hi = 0, len(bounds) - 1  # the smallest cut that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if backend.count(cut(mid).text, sample.answer_prefix) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return cut(lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", default="niah_multikey_1")
    ap.add_argument("--length", type=int, default=49152, help="the long prompt's length (the harness's samples)")
    ap.add_argument("--indices", default="0,1,2,3", help="the samples, by index")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--fold-local-size", type=int, default=None,
                    help="move every needle, the cut ones too, to where DCA with this local size shows it")
    ap.add_argument("--out", default="benchmarks/results/needle_in_range.jsonl")
    args = ap.parse_args()
    llm = LLM(args.model, max_num_seqs=1, dtype=args.dtype, dca=False, sparse=False)
    trained = llm.engine.model_config.trained_context_length
    backend = InProcessBackend(llm)
    dtype = backend.machine["dtype"]
    fold = DCAConfig(enabled=True, local_size=args.fold_local_size).resolve(llm.engine.model_config)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["task"], r["length"], r["index"], r["dtype"], r.get("fold_local_size"))
                    for r in map(json.loads, f)}
    sizes: dict = {}
    for name in parse_tasks(args.tasks):
        task = ALL_TASKS[name]
        for index in map(int, args.indices.split(",")):
            if (name, args.length, index, dtype, args.fold_local_size) in done:
                continue
            sample, long_ids = build_sample(backend, task, args.length, index, 0, sizes)
            long_at = needle_distances(backend, sample)
            room = 64 * len(long_at) if args.fold_local_size else 0  # for the needles put back
            short = cut_head(backend, sample, trained - task.tokens_to_generate - room)
            if args.fold_local_size:
                shown = shown_distances(long_at, len(long_ids), fold)
                short = fold_in(backend, short, sample, shown)
            short_at = needle_distances(backend, short)
            if args.fold_local_size:
                print(f"{name} #{index}: needles (value: tokens back in the long prompt, as DCA shows it, as "
                      f"placed): {', '.join(f'{v}: {long_at[v]}, {shown[v]}, {short_at.get(v)}' for v in long_at)}",
                      flush=True)
            if any(v not in short_at for v in sample.outputs):
                far = ", ".join(f"{v} {d} back{' (asked)' * (v in sample.outputs)}" for v, d in long_at.items())
                print(f"{name} #{index}: an asked needle is more than the trained length before the question "
                      f"(needles: {far})")
                continue
            ids = backend.render(short.text, short.answer_prefix)
            answer = backend.generate(ids, task.tokens_to_generate)
            prediction = postprocess(answer.text)
            row = {"task": name, "length": args.length, "index": index, "dtype": dtype,
                   "long_prompt_tokens": len(long_ids), "prompt_tokens": len(ids),
                   "score": METRICS[task.metric]([prediction], [sample.outputs]), "prediction": prediction[:200],
                   "outputs": sample.outputs, "other_needles_answered": other_needles(prediction, sample),
                   # value -> tokens before the prompt's end, in the long prompt and in the cut one (None: cut)
                   "needles": {v: [d, short_at.get(v)] for v, d in long_at.items()},
                   "fold_local_size": args.fold_local_size,
                   "ttft_s": round(answer.ttft_s, 1), "cpu": cpu_summary()}
            print(json.dumps({k: row[k] for k in ("task", "index", "prompt_tokens", "score", "prediction",
                                                  "other_needles_answered", "needles")}), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
