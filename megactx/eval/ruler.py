"""Running RULER against a backend: size each task to the length, generate greedily, score, summarize.

Length counts the rendered prompt (chat template, task text, answer prefix) plus the task's tokens to
generate, in the target's tokenizer (as NVIDIA/RULER does). The haystack size is searched once per task and
length on the first sample; each further sample is checked and shrunk if its own draws came out longer.
Rows are appended to ruler.jsonl as they finish; a rerun skips them.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Callable

from megactx.errors import MegactxError
from megactx.eval.backends import Backend, Progress
from megactx.eval.fitting import largest_fitting
from megactx.eval.results import ResultLog
from megactx.eval.ruler_tasks import ALL_TASKS, NEEDLE_TASKS, TASKS, Sample, Task
from megactx.eval.scoring import METRICS, postprocess

logger = logging.getLogger(__name__)


def parse_tasks(spec: str) -> list[str]:
    """all: RULER's tasks; needles: every needle task, RULER's and ours (haystacks.py); or names."""
    if spec.strip() in ("all", ""):
        return list(TASKS)
    if spec.strip() == "needles":
        return list(NEEDLE_TASKS)
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown:
        hint = " (qa_1 and qa_2 need SQuAD/HotpotQA, not available offline)" if any(t.startswith("qa") for t in unknown) else ""
        raise MegactxError(f"unknown RULER task {unknown[0]!r}{hint}; choose from: all, needles, {', '.join(ALL_TASKS)}")
    return names


def sample_rng(seed: int, task: str, length: int, index: int) -> Callable[[], random.Random]:
    return lambda: random.Random(f"ruler-{seed}-{task}-{length}-{index}")


def build_sample(backend: Backend, task: Task, length: int, index: int, seed: int,
                 sizes: dict[tuple[str, int], int]) -> tuple[Sample, list[int]]:
    rng = sample_rng(seed, task.name, length, index)
    budget = length - task.tokens_to_generate

    def tokens_for(units: int, make: Callable[[], random.Random] = rng) -> int:
        s = task.generate(units, make(), length)
        return backend.count(s.text, s.answer_prefix)

    units = sizes.get((task.name, length))
    if units is None:  # searched on the first sample whichever sample comes first: a resumed run sizes the same
        first = sample_rng(seed, task.name, length, 0)
        units = largest_fitting(lambda u: tokens_for(u, first), budget)
        sizes[(task.name, length)] = units
    while units > 0 and tokens_for(units) > budget:
        units -= 1
    sample = task.generate(units, rng(), length)
    return sample, backend.render(sample.text, sample.answer_prefix)


def run_ruler(backend: Backend, tasks: list[str], lengths: list[int], samples: int | list[int], out_dir: str,
              seed: int = 0, on_row: Callable[[dict | None], None] | None = None,
              on_prefill: Progress | None = None) -> list[dict]:
    """samples: how many of each task and length (indices 0...), or the list of sample indices to run."""
    indices = range(samples) if isinstance(samples, int) else samples
    sizes: dict[tuple[str, int], int] = {}
    with ResultLog(os.path.join(out_dir, "ruler.jsonl"), lambda r: (r["task"], r["length"], r["index"]),
                   on_row) as log:
        for length in lengths:
            for name in tasks:
                task = ALL_TASKS[name]
                for index in indices:
                    if log.skip((name, length, index)):
                        continue
                    sample, ids = build_sample(backend, task, length, index, seed, sizes)
                    answer = backend.generate(ids, task.tokens_to_generate, on_prefill)
                    prediction = postprocess(answer.text)
                    score = METRICS[task.metric]([prediction], [sample.outputs])
                    logger.info("ruler %s length %d sample %d: %.0f", name, length, index, score)
                    log.add({"task": name, "length": length, "index": index, "haystack": task.haystack,
                             "prompt_tokens": len(ids), "prediction": prediction, "outputs": sample.outputs,
                             "score": score, "other_needles_answered": other_needles(prediction, sample),
                             "ttft_s": round(answer.ttft_s, 3), **backend.machine,
                             **answer.stats})
    return log.rows


def other_needles(prediction: str, sample: Sample) -> list[str]:
    """The values of needles not asked about that the prediction holds: a miss that read the wrong needle."""
    return [v for v in sample.others if v.lower() in prediction.lower() and v not in sample.outputs]


def summarize(rows: list[dict], tasks: list[str], lengths: list[int]) -> dict:
    """{"tasks": {task: {length: score}}, "per_length": {length: mean over tasks}, "avg": mean over lengths}.
    A task's score at a length is the mean of its samples' scores (RULER's metric over the samples)."""
    table: dict[str, dict[int, float]] = {}
    for name in tasks:
        for length in lengths:
            scores = [r["score"] for r in rows if r["task"] == name and r["length"] == length]
            if scores:
                table.setdefault(name, {})[length] = sum(scores) / len(scores)
    per_length = {}
    for length in lengths:
        values = [table[t][length] for t in table if length in table[t]]
        if values:
            per_length[length] = sum(values) / len(values)
    avg = sum(per_length.values()) / len(per_length) if per_length else float("nan")
    return {"tasks": table, "per_length": per_length, "avg": avg}


def format_table(summary: dict, lengths: list[int]) -> str:
    """Markdown: one row per task, one column per length, then the per-length score and Avg."""
    from megactx.eval.plots import length_label
    head = "| task | haystack | " + " | ".join(length_label(n) for n in lengths) + " |"
    lines = [head, "|---|---|" + "---|" * len(lengths)]
    for name, scores in summary["tasks"].items():
        cells = [f"{scores[n]:.1f}" if n in scores else "" for n in lengths]
        lines.append(f"| {name} | {ALL_TASKS[name].haystack} | " + " | ".join(cells) + " |")
    per = summary["per_length"]
    lines.append("| **score** | | " + " | ".join(f"**{per[n]:.1f}**" if n in per else "" for n in lengths) + " |")
    lines.append(f"\nAvg. over lengths: **{summary['avg']:.1f}** (RULER-{len(summary['tasks'])}; "
                 "essay haystacks are the offline essay-substitute, not Paul Graham's essays)")
    return "\n".join(lines)
