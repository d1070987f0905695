"""RULER's scoring (scripts/eval/synthetic/constants.py): the prediction is stripped and control characters
become newlines; references are matched case-insensitively as substrings."""
from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of the fraction of references found, x 100 (niah, vt, cwe, fwe)."""
    per_sample = [sum(r.lower() in p.lower() for r in refs) / len(refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(per_sample) / len(per_sample)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of 1 if any reference is found, x 100 (qa)."""
    per_sample = [max(r.lower() in p.lower() for r in refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(per_sample) / len(per_sample)


METRICS = {"all": string_match_all, "part": string_match_part}
