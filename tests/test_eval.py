"""Evaluation harness: generators, sizing, scorers, resume, outputs, on the bundled model's tokenizer."""
import os
import random

import pytest

from megactx.eval import passkey, ruler
from megactx.eval.backends import InProcessBackend
from megactx.eval.fitting import largest_fitting
from megactx.eval.results import read_rows
from megactx.eval.ruler_tasks import ALL_TASKS, EXTRA_TASKS, TASKS
from megactx.eval.scoring import postprocess, string_match_all, string_match_part


@pytest.fixture(scope="module")
def backend():
    from megactx import LLM
    return InProcessBackend(LLM(None, max_model_len=4096, max_num_seqs=1))


def test_scorers_agree_with_hand_computed_cases():
    preds = ["The numbers are 123 and 456.", "nothing here", "ABC-def 789"]
    refs = [["123", "456", "999"], ["1"], ["abc-DEF"]]
    assert string_match_all(preds, refs) == pytest.approx(100 * (2 / 3 + 0 + 1) / 3)
    assert string_match_part(preds, refs) == pytest.approx(100 * 2 / 3)
    assert postprocess("  a\tb\x00c \n") == "a\nb\nc"
    assert passkey.score("The pass key is 12345. 678", 12345) == (True, True)
    assert passkey.score("It is 99 or maybe 12345", 12345) == (False, True)  # the first integer decides
    assert passkey.score("no digits", 12345) == (False, False)


def test_niah_singular_rewrite_and_plural_for_multi_value():
    single = TASKS["niah_single_1"].generate(10, random.Random(0), 4096)
    assert single.text.startswith("A special magic number is hidden within the following text.")
    assert "What is the special magic number for " in single.text
    assert single.answer_prefix.endswith(" mentioned in the provided text is")
    assert "One of the special magic numbers for " in single.text  # the needle keeps the plural
    multi = TASKS["niah_multivalue"].generate(600, random.Random(0), 4096)
    assert multi.text.startswith("Some special magic numbers are hidden") and len(multi.outputs) == 4
    assert all(f"is: {v}." in multi.text for v in multi.outputs)
    query = TASKS["niah_multiquery"].generate(600, random.Random(0), 4096)
    assert ", and " in query.answer_prefix and len(query.outputs) == 4


def test_needle_samples_name_the_other_needles_and_a_miss_that_took_one():
    """A multi-key sample's other needles (and, in multikey_2, every haystack line's) are each in the text with
    their value; a prediction that holds one of them is a miss that read the wrong needle."""
    for name, least in [("niah_multikey_1", 3), ("niah_multikey_2", 200)]:
        s = TASKS[name].generate(200, random.Random(1), 8192)
        assert len(s.others) >= least and not set(s.others) & set(s.outputs), name
        assert all(f"is: {v}." in s.text for v in s.others), name
        wrong = s.others[0]
        assert ruler.other_needles(f": {wrong}.", s) == [wrong]
        assert ruler.other_needles(f"{s.outputs[0]}.", s) == []
    assert TASKS["niah_single_1"].generate(50, random.Random(1), 4096).others == []


def test_a_resumed_ruler_run_builds_the_same_samples(backend):
    """The haystack size is searched on the first sample even when a resumed run starts at a later one: sample 1
    built alone equals sample 1 built after sample 0 (its own search found another size: 2 tokens off at 48K)."""
    task = TASKS["niah_multikey_1"]
    in_order: dict = {}
    ruler.build_sample(backend, task, 2048, 0, 0, in_order)
    after_first = ruler.build_sample(backend, task, 2048, 1, 0, in_order)
    alone = ruler.build_sample(backend, task, 2048, 1, 0, {})
    assert alone[1] == after_first[1] and alone[0].outputs == after_first[0].outputs


def test_generators_are_reproducible_from_the_seed():
    assert passkey.make_key(0, 4096, 50, 1) == passkey.make_key(0, 4096, 50, 1)
    assert passkey.make_key(0, 4096, 50, 1) != passkey.make_key(1, 4096, 50, 1)
    for name, task in ALL_TASKS.items():
        a = task.generate(40, ruler.sample_rng(0, name, 4096, 3)(), 4096)
        b = task.generate(40, ruler.sample_rng(0, name, 4096, 3)(), 4096)
        c = task.generate(40, ruler.sample_rng(1, name, 4096, 3)(), 4096)
        assert (a.text, a.outputs) == (b.text, b.outputs), name
        assert a.outputs != c.outputs, name
        assert all(o.lower() in a.text.lower() for o in a.outputs) or name == "cwe", name


def test_our_needle_tasks_hide_one_needle_in_their_own_haystacks():
    """code, log lines and needle-like prose each contain the needle sentence exactly once; the haystack-word
    task's value is a word the haystack uses elsewhere too."""
    for name, marker in [("niah_code", "def "), ("niah_logs", "Z INFO "), ("niah_similar", "special magic")]:
        s = EXTRA_TASKS[name].generate(300, random.Random(5), 8192)
        assert marker in s.text and s.text.count("One of the special magic numbers for ") == 1, name
        assert f"is: {s.outputs[0]}." in s.text and s.outputs[0].isdigit()
    word = EXTRA_TASKS["niah_haystack_word"].generate(3000, random.Random(5), 8192)
    value = word.outputs[0]
    assert f"words for " in word.text and f"is: {value}." in word.text
    assert word.text.count(value) > 1  # also in the haystack: the answer cannot be told by being unusual
    assert ruler.parse_tasks("needles")[-4:] == list(EXTRA_TASKS) and "vt" not in ruler.parse_tasks("needles")
    assert ruler.parse_tasks("all") == list(TASKS)


def test_passkey_depth_places_the_key_between_whole_sentences():
    top, bottom = passkey.build_prompt(50, 0, 12345), passkey.build_prompt(50, 100, 12345)
    assert top.startswith(passkey.INTRO + "The pass key is 12345.")
    assert bottom.endswith("The pass key is 12345. Remember it. 12345 is the pass key.\n" + passkey.QUESTION)
    middle = passkey.build_prompt(50, 50, 12345)
    before = middle.split("The pass key")[0][len(passkey.INTRO):]
    assert before.count(". ") == 25


def test_largest_fitting_finds_the_boundary():
    for per, base, target in [(3, 10, 1000), (7, 0, 5), (1, 5, 7), (13, 40, 100000)]:
        calls = []
        f = lambda n: calls.append(n) or base + per * n + (n % 3 == 0)  # noqa: E731 - nearly linear, not exactly
        n = largest_fitting(f, target)
        assert f(n) <= target < f(n + 1)
        assert len(calls) < 30


@pytest.mark.parametrize("length", [1000, 3000])
def test_prompts_are_within_one_percent_of_the_length(backend, length):
    key = passkey.make_key(0, length, 50, 0)
    n = largest_fitting(lambda k: backend.count(passkey.build_prompt(k, 50, key)), length)
    assert 0.99 * length <= backend.count(passkey.build_prompt(n, 50, key)) <= length

    if length < 3000:
        return
    sizes = {}
    for name in TASKS:
        task = TASKS[name]
        sample, ids = ruler.build_sample(backend, task, length, 0, 0, sizes)
        total = len(ids) + task.tokens_to_generate
        # within 1 %, or within one haystack unit where a unit is longer (a uuid needle line is ~70 tokens)
        grown = task.generate(sizes[(name, length)] + 1, ruler.sample_rng(0, name, length, 0)(), length)
        unit = backend.count(grown.text, grown.answer_prefix) + task.tokens_to_generate - total
        assert length - max(0.01 * length, unit) <= total <= length, (name, total, unit)


def test_passkey_run_writes_jsonl_heatmap_and_resumes(backend, tmp_path):
    from megactx.eval.plots import passkey_heatmap
    rows = passkey.run_passkey(backend, [256], [0, 100], 1, str(tmp_path))
    assert [(r["length"], r["depth"]) for r in rows] == [(256, 0), (256, 100)]
    assert all(r["prompt_tokens"] <= 256 and r["prompt_tokens"] >= 250 for r in rows)
    with open(tmp_path / "passkey.jsonl", "a") as f:
        f.write('{"length": 256, "depth": 50')  # a line cut short by a crash: that cell is redone
    computed = []
    rows = passkey.run_passkey(backend, [256], [0, 50, 100], 1, str(tmp_path), on_row=computed.append)
    assert [r["depth"] if r else None for r in computed] == [None, 50, None]  # only the new cell ran
    assert len(rows) == 3
    lines = read_rows(str(tmp_path / "passkey.jsonl"))
    assert len(lines) == 3  # the broken line is skipped, the row after it is whole
    assert {"length", "depth", "trial", "key", "answer", "correct", "ttft_s", "cpu", "dtype"} <= set(lines[-1])
    assert " cores" in lines[-1]["cpu"]  # where each figure was made
    png = passkey_heatmap(*passkey.accuracy_grid(rows), str(tmp_path / "h.png"))
    assert os.path.getsize(png) > 1000
    table = passkey.summarize(rows)
    assert table[0]["cells"] == 3 and 0 <= table[0]["accuracy"] <= 100


def test_rows_record_what_sparse_prefill_did_and_the_peak_memory(backend, tmp_path):
    """In-process rows carry the engine's sparse probe summary: a density between the plans' and 1, the estimate's
    and the attention's seconds; and the process's peak RSS."""
    from megactx import LLM
    llm = LLM(None, max_model_len=600, max_num_seqs=1, sparse_threshold=0, sparse_estimate="pooled",
              sparse_mass=0.3, sparse_block_size=32, sparse_dense_tail=0, sparse_max_density=1.0)
    r = passkey.run_passkey(InProcessBackend(llm), [512], [50], 1, str(tmp_path))[0]
    assert 0 < r["sparse_density"] < 1 and r["estimate_s"] >= 0 and r["sparse_attention_s"] > 0
    assert r["fallbacks"] == 0 and r["peak_rss_gb"] > 0.1
    dense = passkey.run_passkey(backend, [512], [50], 1, str(tmp_path / "dense"))[0]
    assert "sparse_density" not in dense and dense["peak_rss_gb"] > 0.1  # below the threshold: nothing sparse


def test_ruler_run_scores_and_summarizes(backend, tmp_path):
    rows = ruler.run_ruler(backend, ["niah_single_1", "vt"], [1024], 1, str(tmp_path))
    assert len(rows) == 2 and all(r["prompt_tokens"] + TASKS[r["task"]].tokens_to_generate <= 1024 for r in rows)
    for r in rows:
        assert r["score"] == string_match_all([r["prediction"]], [r["outputs"]])
        assert r["dtype"] == backend.llm.engine.compute_dtype and r["cpu"]
        assert r["other_needles_answered"] == []  # single-needle tasks: no other needle to take
    summary = ruler.summarize(rows, ["niah_single_1", "vt"], [1024])
    assert summary["avg"] == pytest.approx((rows[0]["score"] + rows[1]["score"]) / 2)
    assert "| niah_single_1 | noise |" in ruler.format_table(summary, [1024])
    again = []
    ruler.run_ruler(backend, ["niah_single_1", "vt"], [1024], 1, str(tmp_path), on_row=again.append)
    assert again == [None, None]
    chosen = ruler.run_ruler(backend, ["niah_single_1"], [1024], [2], str(tmp_path / "chosen"))
    assert [r["index"] for r in chosen] == [2]  # --indices: only the samples asked for


def test_long_prompts_report_prefill_progress(tmp_path):
    """on_prefill(done, total) follows each engine step of a prompt (the command line draws its tokens/s and ETA
    bar from it), and the passkey row is the same as without it."""
    from megactx import LLM
    llm = LLM(None, max_model_len=4096, max_num_seqs=1, max_num_batched_tokens=256, dtype="fp32")
    seen = []
    rows = passkey.run_passkey(InProcessBackend(llm), [1024], [50], 1, str(tmp_path),
                               on_prefill=lambda done, total: seen.append((done, total)))
    total = rows[0]["prompt_tokens"]
    prefill = [d for d, t in seen if t == total and d < total]
    assert prefill == list(range(256, total, 256))  # every step, in order, in tokens
    assert seen[-1] == (total, total)


def test_eval_with_dca_sizes_the_context_to_the_lengths_asked_for(tiny_dir, tmp_path):
    """--dca runs beyond the trained length: the context is what the lengths need, not the trained length (a 64K
    passkey run once got 32K prompts that way); without DCA it stays within the model's context."""
    from megactx.commands import build_parser
    from megactx.commands.eval import _open
    from megactx.engine.llm_engine import derived_max_len
    from megactx.loader import open_model
    path = tiny_dir("qwen2", num_key_value_heads=2)
    trained = derived_max_len(open_model(path).config)
    args = build_parser().parse_args(["eval", "passkey", "--model", path, "--dca", "--out", str(tmp_path)])
    assert _open(args, [trained * 4], 32).max_model_len == trained * 4 + 32
    args = build_parser().parse_args(["eval", "passkey", "--model", path, "--out", str(tmp_path)])
    assert _open(args, [trained * 4], 32).max_model_len == trained
