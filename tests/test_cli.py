"""The CLI as a user runs it: `megactx chat` reads stdin, streams answers, attaches files."""
import os
import subprocess
import sys


def run(args, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megactx.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_chat_two_turns_with_an_attached_file(tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("The secret city is Paris.\n")
    r = run(["chat", "--file", str(doc), "--max-tokens", "24"],
            "Which city is the secret city?\nAnd what country is it in?\n")
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and "Paris" in answers[0]  # one answer per turn, the file seen in the first


def test_chat_missing_attachment_is_a_clear_error(tmp_path):
    r = run(["chat", "--file", str(tmp_path / "nope.txt")], "hi\n")
    assert r.returncode == 2 and "nope.txt: no such file to attach" in r.stderr and "Traceback" not in r.stderr


def test_bench_ttft_json_rows_and_eval_input_errors(tmp_path):
    import json

    import torch
    bad = tmp_path / "bad.json"
    bad.write_text('[{"0": ["diagonal", 1, 2, 0]}]')
    # each row is a fresh process loading the model (peak memory is per row), so one length only
    r = run(["bench", "ttft", "--lengths", "64", "--dtypes", "fp32,bf16", "--json"], "")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["engine"], x["mode"], x["dtype"], x["length"]) for x in rows] == [
        ("megactx", "dense", "fp32", 64), ("megactx", "dense", "bf16", 64)]
    assert all(set(x) == {"engine", "mode", "dtype", "length", "ttft_s", "prefill_tok_s", "peak_rss_mb", "cpu"}
               for x in rows)
    # each row names the CPU's kernels: the ratios differ between AVX2 and AVX512 machines
    assert {x["cpu"] for x in rows} == {torch.backends.cpu.get_cpu_capability()}
    assert all(x["ttft_s"] > 0 and x["peak_rss_mb"] > 100 for x in rows)
    for args, message in [(["eval", "passkey", "--lengths", "4x", "--out", str(tmp_path)], "'4x' is not a number"),
                          (["eval", "ruler", "--tasks", "qa_1", "--out", str(tmp_path)], "unknown RULER task 'qa_1'"),
                          (["bench", "ttft", "--compare", "vllm"], "unknown engine 'vllm'"),
                          (["generate", "--sparse-config", str(bad), "hi"], "bad.json: layer 0 head 0: unknown pattern"),
                          (["bench", "ttft", "--modes", "fast"], "unknown mode 'fast'"),
                          (["bench", "ttft", "--dtypes", "fp8"], "unknown dtype 'fp8'"),
                          (["bench", "ttft", "--sparse-mass", "1.5"], "--sparse-mass 1.5: a share of the attention"),
                          (["generate", "--sparse-block-size", "8", "hi"], "--sparse-block-size 8: a kernel block")]:
        r = run(args, "")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_a_bad_flag_value_is_one_line_naming_the_choices():
    r = run(["generate", "--sparse-estimate", "columns", "hi"], "")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["megactx generate: error: argument --sparse-estimate: invalid choice: "
                                             "'columns' (choose from 'auto', 'vertical-slash', 'pooled')"]
