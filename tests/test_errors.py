"""Bad input: one clear message naming the file and the problem; a typed exception in Python, exit code 2 and
no traceback in the CLI; nothing half-loaded."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from megactx import LLM, ModelLoadError, RequestError, SamplingParams
from megactx.commands import main


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megactx.commands", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        LLM(str(tmp_path / "nope"))


def test_directory_without_weights(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir("llama"), tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        LLM(d)


def test_directory_without_config(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path))


def edit_config(d, **changes):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(p, "w"))


def test_unknown_architecture(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir("llama"), tmp_path / "m")
    edit_config(d, architectures=["MambaForCausalLM"], model_type="mamba")
    with pytest.raises(ModelLoadError, match="unknown architecture.*MambaForCausalLM"):
        LLM(d)


def test_config_missing_a_key(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir("llama"), tmp_path / "m")
    edit_config(d, hidden_size=None)
    with pytest.raises(ModelLoadError, match="config.json: missing required key.*hidden_size"):
        LLM(d)


def test_config_shape_mismatch(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir("llama"), tmp_path / "m")
    edit_config(d, intermediate_size=96)
    with pytest.raises(ModelLoadError, match="has shape .* the config implies"):
        LLM(d)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir("llama"), tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupt or truncated"):
        LLM(d)


def test_truncated_and_garbage_gguf(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(5_000_000))
    with pytest.raises(ModelLoadError, match="cut.gguf: corrupt or truncated GGUF"):
        LLM(str(cut))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(1000))
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        LLM(str(junk))


def test_request_errors_name_the_numbers(tiny_dir):
    llm = LLM(tiny_dir("llama"), max_model_len=64)
    with pytest.raises(RequestError, match=r"maximum context length is 64 tokens; the prompt has 50 .* 20 more"):
        llm.generate([list(range(100, 150))], SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="out of range"):
        llm.generate([[10**7]], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    r = cli("generate", "--model", str(tmp_path / "missing.gguf"), "hi")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.gguf: no such file" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    r = cli("inspect", str(bad))
    assert r.returncode == 2 and "bad.gguf" in r.stderr and "Traceback" not in r.stderr


def test_cli_generate_and_inspect_on_the_bundled_model(capsys):
    assert main(["generate", "--max-tokens", "8", "--chat", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["inspect", "--tokens", "100000"]) == 0
    text = capsys.readouterr().out
    assert "llama (30 layers" in text and "context length:   8192" in text and "chat template:    present" in text
    assert "KV cache fp32      46080 bytes/token; 100000 tokens: 4.3 GiB" in text
    assert "pooled block estimate" in text and "cut-off 0.7 " in text  # no budgets beside the model: pooled
    assert main(["inspect", "--sparse-estimate", "vertical-slash", "--sparse-mass", "0.95"]) == 0
    text = capsys.readouterr().out
    assert "default budgets (1000 verticals, 6096 slashes), mass cut-off 0.95" in text  # what serve would run
