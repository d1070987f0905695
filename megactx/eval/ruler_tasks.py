"""RULER's 11 synthetic tasks (NVIDIA/RULER, arXiv 2404.06654), generated offline from a seed.

Each generator takes the haystack size (its unit differs per task: noise lines, essay words, distractor
needles, list words) and a random.Random, and returns the task text, the answer prefix and the reference
strings. The harness finds the largest size whose rendered prompt plus the tokens to generate fits the length.
"""
from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable

from megactx.eval.haystacks import HAYSTACKS
from megactx.eval.words import NOUNS, essay_substitute_words, key_words, vocabulary

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40) rounded


@dataclass(slots=True)
class Sample:
    text: str  # the user turn
    answer_prefix: str  # appended after the assistant header
    outputs: list[str]  # reference strings
    # needle tasks: the values of the needles not asked about. A wrong answer holding one of them read the wrong
    # needle (a key confused), rather than losing the text or mangling the value
    others: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    tokens_to_generate: int
    metric: str  # "all" (string_match_all) or "part"
    generate: Callable[[int, random.Random, int], Sample]  # (haystack size, rng, length) -> sample
    haystack: str  # what fills the context, named in reports


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # 7 digits
    if kind == "words":
        return rng.choice(key_words())
    if kind == "nouns":  # single nouns: words the essay haystack itself is full of
        return rng.choice(NOUNS)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _niah(haystack: str, type_k: str, type_v: str, num_k: int, num_v: int, num_q: int):
    num_k = max(num_k, num_q)
    kind_v, type_v = type_v, "words" if type_v == "nouns" else type_v  # the value's kind, the template's name

    def generate(size: int, rng: random.Random, length: int) -> Sample:
        keys, values, needles, decoys = [], [], [], []
        for _ in range(num_k):
            keys.append(_random_value(type_k, rng))
            values.append([_random_value(kind_v, rng) for _ in range(num_v)])
            needles += [NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=v) for v in values[-1]]
        rng.shuffle(needles)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        if haystack == "essay":
            words = essay_substitute_words(size)
            sentences = re.split(r"(?<=\.) ", " ".join(words).strip())
            for needle, depth in zip(reversed(needles), reversed(depths)):
                sentences.insert(int(len(sentences) * depth / 100), needle)
            context = " ".join(sentences)
        else:
            if haystack == "noise":
                lines = [NOISE] * size
            elif haystack in HAYSTACKS:
                lines = HAYSTACKS[haystack](size, rng)
            else:  # every line a distractor needle
                lines = []
                for _ in range(size):
                    key = _random_value(type_k, rng)
                    decoys.append(_random_value(type_v, rng))
                    lines.append(NEEDLE.format(type_needle_v=type_v, key=key, value=decoys[-1]))
            for needle, depth in zip(reversed(needles), reversed(depths)):
                lines.insert(int(len(lines) * depth / 100), needle)
            context = "\n".join(lines)
        picked = rng.sample(range(num_k), num_q)
        queries = [keys[i] for i in picked]
        answers = [v for i in picked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, type_name = NIAH_TEMPLATE, NIAH_PREFIX, type_v
        if num_q * num_v == 1:  # RULER's rewrite to the singular
            template, prefix = (_singular(s) for s in (template, prefix))
            type_name = type_v[:-1]
        others = [v for i in range(num_k) if i not in picked for v in values[i]] + decoys
        return Sample(template.format(type_needle_v=type_name, context=context, query=query),
                      prefix.format(type_needle_v=type_name, query=query), answers, others)
    return generate


def _singular(text: str) -> str:
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _vt_chain(rng: random.Random, num_hops: int, name_len: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, chain


def _vt_text(size: int, rng: random.Random, num_hops: int, name_len: int) -> tuple[str, str, list[str]]:
    names, chain = _vt_chain(rng, num_hops, name_len)
    lines = [NOISE] * size
    positions = sorted(rng.choices(range(len(lines) + 1), k=len(chain)))  # chain order kept, any haystack size
    for offset, (pos, statement) in enumerate(zip(positions, chain)):
        lines.insert(pos + offset, statement)
    context = "\n".join(lines)
    value = chain[0].split("=")[-1].strip()
    return VT_TEMPLATE.format(context=context, query=value), VT_PREFIX.format(num_v=num_hops + 1, query=value), names


def _vt(size: int, rng: random.Random, length: int) -> Sample:
    example, example_prefix, example_names = _vt_text(5, rng, 4, 5)  # the one-shot example, same generator
    text, prefix, names = _vt_text(size, rng, 4, 5)
    one_shot = example + example_prefix + " ".join(example_names)
    return Sample(one_shot + "\n\n" + text, prefix, names)


def _cwe_list(rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int):
    words = vocabulary(num_words, rng)
    common, uncommon = words[:10], words[10:]
    items = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common


def _cwe(size: int, rng: random.Random, length: int) -> Sample:
    short = length < 4096  # RULER's smaller setting for short contexts
    example, example_answer = _cwe_list(rng, 20 if short else 40, 3 if short else 10, 1 if short else 3)
    context, answer = _cwe_list(rng, size + 10, 6 if short else 30, 1 if short else 3)
    one_shot = (CWE_TEMPLATE.format(context=example) + CWE_PREFIX + " "
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_answer)))
    return Sample(one_shot + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, answer)


def _fwe(size: int, rng: random.Random, length: int) -> Sample:
    vocab_size = max(10, length // 50)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # rank 1 is noise
    zeta2 = 1.6449340668482264  # zeta(2.0)
    words = [w for k, w in enumerate(ranked, start=1) for _ in range(int(size * k ** -2.0 / zeta2))]
    rng.shuffle(words)
    return Sample(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, ranked[1:4])


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("niah_single_1", 128, "all", _niah("noise", "words", "numbers", 1, 1, 1), "noise"),
    Task("niah_single_2", 128, "all", _niah("essay", "words", "numbers", 1, 1, 1), "essay-substitute"),
    Task("niah_single_3", 128, "all", _niah("essay", "words", "uuids", 1, 1, 1), "essay-substitute"),
    Task("niah_multikey_1", 128, "all", _niah("essay", "words", "numbers", 4, 1, 1), "essay-substitute"),
    Task("niah_multikey_2", 128, "all", _niah("needle", "words", "numbers", 1, 1, 1), "needles"),
    Task("niah_multikey_3", 128, "all", _niah("needle", "uuids", "uuids", 1, 1, 1), "needles"),
    Task("niah_multivalue", 128, "all", _niah("essay", "words", "numbers", 1, 4, 1), "essay-substitute"),
    Task("niah_multiquery", 128, "all", _niah("essay", "words", "numbers", 4, 1, 4), "essay-substitute"),
    Task("vt", 30, "all", _vt, "noise"),
    Task("cwe", 120, "all", _cwe, "word list"),
    Task("fwe", 50, "all", _fwe, "coded words"),
]}

# Needle tasks of our own, beyond RULER's (not in "all", which stays RULER-13's comparable set): haystacks that
# look like what users send, and values that also occur in the haystack
EXTRA_TASKS: dict[str, Task] = {t.name: t for t in [
    Task("niah_code", 128, "all", _niah("code", "words", "numbers", 1, 1, 1), "python code"),
    Task("niah_logs", 128, "all", _niah("logs", "words", "numbers", 1, 1, 1), "log lines"),
    Task("niah_similar", 128, "all", _niah("similar", "words", "numbers", 1, 1, 1), "needle-like prose"),
    Task("niah_haystack_word", 128, "all", _niah("essay", "words", "nouns", 1, 1, 1), "essay-substitute"),
]}
ALL_TASKS = {**TASKS, **EXTRA_TASKS}
NEEDLE_TASKS = [name for name in ALL_TASKS if name.startswith("niah")]
