"""BENCHMARKS.md part for retrieval beyond the trained length on more than the passkey prompt: RULER's needle tasks
and ours, task x length x setting, from the `megactx eval ruler` folders named in SETTINGS (the same samples in
each: a sample is generated from the seed, task, length and index only)."""
from __future__ import annotations

import os

from megactx.eval.results import read_rows
from megactx.eval.ruler_tasks import ALL_TASKS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# folder -> the setting's name and its flags
SETTINGS = {
    "ruler_eval_dca_dense_bf16": ("dense DCA", "--dca --no-sparse --dtype bf16"),
    "ruler_eval_dca_sparse_bf16": ("DCA + sparse", "--dca --dtype bf16 (pooled estimate, the default)"),
    "ruler_eval_dca_dense_fp32": ("dense fp32", "--dca --no-sparse, fp32 (--dtype auto on an AVX2 CPU)"),
    "ruler_eval_dca_sparse_fp32_temp_position": ("sparse fp32", "--dca --dca-temperature position, fp32 "
                                                                       "(--dtype auto on an AVX2 CPU)"),
    "ruler_eval_dca_sparse_fp32_mass0.8": ("sparse fp32 0.8", "--dca --sparse-mass 0.8, fp32"),
    "ruler_eval_dca_sparse_fp32_mass0.9": ("sparse fp32 0.9", "--dca --sparse-mass 0.9, fp32"),
    "ruler_eval_dca_sparse_fp32_temp_none": ("sparse fp32 no temp.", "--dca --dca-temperature none, "
                                                                                  "fp32"),
}
# what the misses were traced to so far (benchmarks/needle_recall.py and the columns above)
CAUSES = [
    "Multikey_1 #0 at 48K is lost by DCA itself, in both dtypes, not by the sparse plans. Dense DCA answers another "
    "needle's value, 4959446, in fp32 and in bf16: that needle sits 2.5K tokens before the question, inside DCA's "
    "own chunk at its true distance, while the asked one (24K tokens earlier) is read through the previous chunk. "
    "In layer 16 it takes 0.176 of the last row's attention against the answer's 0.123 "
    "(`benchmarks/needle_recall.py`); without the temperature (0.130 against 0.140) dense DCA in bf16 answers "
    "right: the sample is on an edge. DCA + sparse answers a blend, 4915101 (the other needle's first digit, then "
    "the asked value), at cut-offs 0.7 and 0.8, and the right value at 0.9. A diagnostic run with cut-off 0.9 "
    "only for the query blocks within 2K tokens of the asked needle (0.7 elsewhere) still gave the blend; 0.9 "
    "everywhere but there gave dense DCA's answer, the other needle's value (fp32, one run each). So plans closer "
    "to dense move the answer to dense DCA's: the right answer at 0.9 is the edge tipping the other way, not "
    "keys that the default plans drop.",
    "Multikey_1 #2 at 48K gets the same wrong value in every setting, dense and sparse, fp32 and bf16: the needle "
    "at token 26444 instead of the asked one at 42667. The asked needle is the recent one here; under DCA the "
    "other is read through the previous chunk at an apparent distance of 32768 - 26444 = 6324 tokens, next to the "
    "asked one's true 6356. On the multi-key task the misses at 48K come from DCA and the model telling the keys "
    "apart, not from the sparse plans: where both were run, DCA + sparse and dense DCA score the same samples.",
]
TOOK_OTHER = " (another needle's value)"  # the row's other_needles_answered
TRAINED = 32768  # the evaluation model's context: a 32K prompt is in range, DCA is plain RoPE there


def retrieval_grid() -> list[str]:
    runs = {folder: read_rows(os.path.join(RESULTS, folder, "ruler.jsonl")) for folder in SETTINGS}
    runs = {folder: rows for folder, rows in runs.items() if rows}
    if not runs:
        return []
    rows = [r for rs in runs.values() for r in rs]
    tasks = [t for t in ALL_TASKS if any(r["task"] == t for r in rows)]
    lengths = sorted({r["length"] for r in rows})
    cpu = sorted({r.get("cpu", "not recorded") for r in rows})
    columns = [(folder, length) for length in lengths for folder in runs
               if any(r["length"] == length for r in runs[folder])]
    out = ["## Retrieval beyond the trained length, beyond the passkey", "",
           "`megactx eval ruler --model EVAL --tasks T --lengths L --samples N --out DIR` with the settings below, "
           "the same samples in every column; a cell is correct samples / samples (RULER's string match, every "
           f"value for multi-value tasks). {TRAINED // 1024}K is in range (DCA is plain RoPE there and the prompt "
           f"is below the sparse threshold, so both settings are the same model). A reduced grid: "
           f"{len(tasks)} task{'s' * (len(tasks) > 1)}, {len(lengths)} length{'s' * (len(lengths) > 1)}. "
           f"CPU: {'; '.join(cpu)}.", "",
           "| task | haystack | " + " | ".join(f"{length // 1024}K {SETTINGS[f][0]}" for f, length in columns) + " |",
           "|---|---|" + "---:|" * len(columns)]
    for task in tasks:
        cells = []
        for folder, length in columns:
            scores = [r["score"] for r in runs[folder] if r["task"] == task and r["length"] == length]
            cells.append(f"{sum(s >= 100 for s in scores)}/{len(scores)}" if scores else "")
        out.append(f"| {task} | {ALL_TASKS[task].haystack} | " + " | ".join(cells) + " |")
    out += ["", "Settings: " + "; ".join(f"{name}: `{flags}`" for name, flags in
                                         (SETTINGS[f] for f in runs)) + ".", ""]
    out += CAUSES + [""]
    misses = [(folder, r) for folder, rs in runs.items() for r in rs if r["score"] < 100]
    if misses:
        out += ["Missed samples (the answer given, the answer expected):", ""]
        out += [f"- {r['task']} #{r['index']} at {r['length'] // 1024}K, {SETTINGS[folder][0]}: "
                f"`{r['prediction'].strip(' :.')[:40]}` for `{', '.join(r['outputs'])[:40]}`"
                f"{TOOK_OTHER if r.get('other_needles_answered') else ''}"
                for folder, r in misses]
        out.append("")
    return out
