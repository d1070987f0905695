"""Does lm-evaluation-harness score a multiple-choice task the same through megactx as with transformers?

Runs lm-eval's `local-completions` model against `megactx serve` (loglikelihood requests: token ids, echo,
logprobs 1, max_tokens 1; the server's own tokenizer through /tokenizer_info and /tokenize) and lm-eval's `hf`
model (transformers, fp32, the same GGUF file) on the same task, and compares accuracy and every choice's
log-likelihood. The task is benchmarks/lm_eval/megactx_mc.yaml (40 four-choice questions made for this).

lm-eval is not a megactx dependency: install it beside megactx (`pip install "lm-eval>=0.4,<0.5"`).

  python benchmarks/lm_eval_agreement.py [--model M] [--out benchmarks/results/lm_eval_agreement.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from megactx.config.hardware import cpu_summary  # noqa: E402
from megactx.loader import default_model_path  # noqa: E402

TASK = "megactx_mc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "megactx.commands", "serve", "--model", model, "--port", str(port),
                             "--dtype", "fp32", "--weight-dtype", "fp32", "--max-model-len", "2048",
                             "--served-model-name", "m"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"the server exited with code {proc.returncode}")
            time.sleep(1)
    proc.kill()
    sys.exit("the server did not come up in 300 s")


def evaluate(model: str, model_args: dict) -> tuple[dict, list[list[float]]]:
    """-> the task's metrics and every document's choice log-likelihoods, in document order."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                                  task_manager=TaskManager(include_path=os.path.join(HERE, "lm_eval")))
    metrics = {k.split(",")[0]: v for k, v in out["results"][TASK].items() if k.endswith(",none")}
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return metrics, [[float(r[0][0]) for r in s["resps"]] for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the bundled SmolLM2)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "lm_eval_agreement.json"))
    args = ap.parse_args()
    model = args.model or default_model_path()
    os.chdir(os.path.dirname(HERE))  # the task's data_files path is relative to the repository
    port = free_port()
    server = start_server(model, port)
    try:
        t0 = time.perf_counter()
        served, served_ll = evaluate("local-completions", {
            "model": "m", "base_url": f"http://127.0.0.1:{port}/v1/completions", "tokenizer_backend": "remote",
            "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1})
        served_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)
    t0 = time.perf_counter()
    folder, name = os.path.split(model)
    local, local_ll = evaluate("hf", {"pretrained": folder, "gguf_file": name, "dtype": "float32",
                                      "device": "cpu"})
    local_s = time.perf_counter() - t0
    diffs = [abs(a - b) for x, y in zip(served_ll, local_ll) for a, b in zip(x, y)]
    same_pick = sum(max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
                    for x, y in zip(served_ll, local_ll))
    result = {"cpu": cpu_summary(), "model": os.path.basename(model), "task": TASK, "documents": len(served_ll),
              "megactx_local_completions": {**served, "seconds": round(served_s, 1)},
              "transformers_hf": {**local, "seconds": round(local_s, 1)},
              "max_abs_loglikelihood_diff": round(max(diffs), 5), "same_choice": same_pick}
    print(f"CPU: {result['cpu']}")
    print("| model in lm-eval | acc | acc_norm | s |")
    print("|---|---|---|---|")
    for label, r in (("local-completions -> megactx serve", result["megactx_local_completions"]),
                     ("hf (transformers)", result["transformers_hf"])):
        print(f"| {label} | {r['acc']:.3f} | {r['acc_norm']:.3f} | {r['seconds']} |")
    print(f"same highest-likelihood choice on {same_pick}/{len(served_ll)} documents; largest difference of a "
          f"choice's log-likelihood {result['max_abs_loglikelihood_diff']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
