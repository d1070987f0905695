"""The CLI as a user runs it: `megactx chat` reads stdin, streams answers, attaches files."""
import os
import re
import subprocess
import sys


def run(args, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megactx.commands", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def run_here(args, capsys) -> subprocess.CompletedProcess:
    """The CLI's entry point in this process: for commands that load no model, where a new process would cost
    seconds of imports and test nothing more (the process boundary is covered by the tests that use `run`)."""
    from megactx.commands import main
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_chat_two_turns_with_an_attached_file(tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("".join(f"Note {i}: the weather was fine.\n" for i in range(30)) + "The secret city is Paris.\n")
    r = run(["chat", "--file", str(doc), "--max-tokens", "24"],
            "Which city is the secret city?\nAnd what country is it in?\n")
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and "Paris" in answers[0]  # one answer per turn, the file seen in the first
    assert re.search(r"\(\d+ of \d+ prompt tokens reused from the cache\)", r.stderr)  # the follow-up's prefix


def test_cache_warm_ls_rm_and_a_chat_run_again_on_the_warmed_file(tmp_path, capsys):
    """`cache warm --file` computes the document as chat sends it; a chat started afterwards (a new process) takes
    the document from disk; ls shows the entry; rm clears it."""
    doc = tmp_path / "report.txt"
    doc.write_text("".join(f"Section {i}: the shipments arrived on time.\n" for i in range(40)) +
                   "The code word is tangerine.\n")
    kv = str(tmp_path / "kv")
    r = run(["cache", "warm", "--kv-cache-dir", kv, "--file", str(doc)], "")
    assert r.returncode == 0, r.stderr
    warmed = int(re.search(r"(\d+) blocks written", r.stdout).group(1))
    assert warmed >= 3
    r = run(["chat", "--file", str(doc), "--kv-cache-dir", kv, "--max-tokens", "16"], "What is the code word?\n")
    assert r.returncode == 0, r.stderr
    reused = int(re.search(r"\((\d+) of \d+ prompt tokens reused from the cache\)", r.stderr).group(1))
    assert reused == warmed * 128  # every warmed block, on the first question of a new process
    assert "tangerine" in r.stdout.lower()
    r = run_here(["cache", "ls", "--kv-cache-dir", kv], capsys)
    rows = r.stdout.splitlines()
    assert r.returncode == 0 and len(rows) == 3 and "SmolLM2" in rows[1]
    assert int(rows[1].split()[1]) >= warmed  # chat added its own blocks to the entry
    r = run_here(["cache", "rm", "--kv-cache-dir", kv, "0000"], capsys)
    assert r.returncode == 2 and "no cache entry 0000" in r.stderr
    r = run_here(["cache", "rm", "--kv-cache-dir", kv, rows[1].split()[0]], capsys)
    assert r.returncode == 0 and "deleted 1 entry" in r.stdout
    assert "empty" in run_here(["cache", "ls", "--kv-cache-dir", kv], capsys).stdout


def test_chat_missing_attachment_is_a_clear_error(tmp_path):
    r = run(["chat", "--file", str(tmp_path / "nope.txt")], "hi\n")
    assert r.returncode == 2 and "nope.txt: no such file to attach" in r.stderr and "Traceback" not in r.stderr


def test_bench_ttft_json_rows():
    import json

    from megactx.config.hardware import cpu_summary
    # each row is a fresh process loading the model (peak memory is per row), so one length only; the local size
    # in a row is the one the engine reports it ran with
    r = run(["bench", "ttft", "--lengths", "64", "--modes", "dca", "--dtypes", "fp32,bf16", "--dca-local-sizes", "16",
             "--json"], "")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["engine"], x["mode"], x["dtype"], x["length"], x["dca_local_size"]) for x in rows] == [
        ("megactx", "dca", "fp32", 64, 16), ("megactx", "dca", "bf16", 64, 16)]
    assert all(set(x) == {"engine", "mode", "dtype", "length", "ttft_s", "prefill_tok_s", "peak_rss_mb", "cpu",
                          "dca_local_size"} for x in rows)
    # each row names the CPU's kernels: the ratios differ between AVX2 and AVX512 machines
    assert {x["cpu"] for x in rows} == {cpu_summary()}
    flags = open("/proc/cpuinfo").read()
    assert ("AVX512-BF16" in rows[0]["cpu"]) == (" avx512_bf16" in flags) and ("AMX" in rows[0]["cpu"]) == (" amx_tile" in flags)
    assert all(x["ttft_s"] > 0 and x["peak_rss_mb"] > 100 for x in rows)


def test_input_errors_exit_2_with_a_message_naming_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"0": ["diagonal", 1, 2, 0]}]')
    for args, message in [(["eval", "passkey", "--lengths", "4x", "--out", str(tmp_path)],
                           "'4x' is not a whole number"),
                          (["eval", "passkey", "--depths", "0.5", "--out", str(tmp_path)], "e.g. 0,50,100 (percent)"),
                          (["eval", "ruler", "--tasks", "qa_1", "--out", str(tmp_path)], "unknown RULER task 'qa_1'"),
                          (["eval", "ruler", "--indices", "1,a", "--out", str(tmp_path)], "'a' is not a whole number"),
                          (["eval", "ruler", "--indices", "-1", "--out", str(tmp_path)], "non-negative numbers"),
                          (["bench", "ttft", "--compare", "vllm"], "unknown engine 'vllm'"),
                          (["generate", "--sparse-config", str(bad), "hi"],
                           "bad.json: layer 0 head 0: unknown pattern"),
                          (["bench", "ttft", "--modes", "fast"], "unknown mode 'fast'"),
                          (["bench", "ttft", "--dtypes", "fp8"], "unknown dtype 'fp8'"),
                          (["bench", "ttft", "--sparse-mass", "1.5"], "--sparse-mass 1.5: a share of the attention"),
                          (["bench", "ttft", "--dca-local-sizes", "2K,half"], "'half' is not a whole number"),
                          (["generate", "--dca-local-size", "0", "hi"], "--dca-local-size must be >= 1"),
                          (["generate", "--sparse-mass-union", "hi"], "unrecognized arguments: --sparse-mass-union")]:
        r = run_here(args, capsys)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_a_bad_flag_value_is_one_line_naming_the_choices():
    r = run(["generate", "--sparse-estimate", "columns", "hi"], "")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["megactx generate: error: argument --sparse-estimate: invalid choice: "
                                             "'columns' (choose from 'auto', 'vertical-slash', 'pooled')"]


def test_serve_help_lists_each_flag_once_with_its_default():
    """The flags come from the config fields: each once, with its default; the removed ones are gone."""
    r = run(["serve", "--help"], "")
    assert r.returncode == 0, r.stderr
    flags = re.findall(r"^  (--[a-z-]+)", r.stdout, flags=re.M)
    assert len(flags) == len(set(flags)) and {"--max-model-len", "--dca", "--no-sparse", "--sparse-mass", "--port",
                                              "--api-key", "--kv-cache-dtype", "--threads"} <= set(flags)
    text = " ".join(r.stdout.split())
    for shown in ("(default: 4096)", "(default: 32768)", "(default: 127.0.0.1)", "(default: 8000)", "(default: 0.6)"):
        assert shown in text
    for removed in ("--sparse-exact-diagonals", "--sparse-mass-union", "--sparse-slash-window", "--sparse-last-q",
                    "--sparse-estimate-span", "--sparse-block-size"):
        assert removed not in r.stdout


def test_environment_variables_set_the_flags_defaults():
    from megactx.commands import build_parser
    from megactx.commands.flags import engine_config
    import os
    old = dict(os.environ)
    try:
        os.environ.update(MEGACTX_MAX_MODEL_LEN="2048", MEGACTX_DCA="1", MEGACTX_NO_SPARSE="1",
                          MEGACTX_SPARSE_MASS="0.8", MEGACTX_PORT="9001")
        args = build_parser().parse_args(["serve"])
        config = engine_config(args)
        assert (config.scheduler.max_model_len, config.dca.enabled, config.sparse.enabled, config.sparse.mass) == (
            2048, True, False, 0.8)
        assert args.port == 9001
        args = build_parser().parse_args(["serve", "--max-model-len", "4096"])  # a flag wins over the variable
        assert engine_config(args).scheduler.max_model_len == 4096
    finally:
        os.environ.clear()
        os.environ.update(old)
