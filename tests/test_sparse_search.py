"""`megactx sparse search`: recall is the softmax mass inside the pattern's mask, the cheapest passing candidate
wins, the JSON resumes per layer; refine measures recall exp(lse_sparse - lse_full) (1 for full budgets) and
raises the budgets of the heads below the threshold."""
import json

import torch

from megactx import LLM
from megactx.attention.sparse.patterns import HeadPattern, load_patterns
from megactx.tools.sparse_search import run_refine, run_search, search_layer
from helpers import token_ids
from test_sparse_kernel import _naive_vs_mask


def test_search_layer_recall_is_mass_inside_the_mask_and_cheapest_passing_wins():
    h, hkv, d, m, r, block = 4, 2, 16, 200, 40, 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(r, h, d, generator=g), torch.randn(hkv, m, d, generator=g)
    small, big = HeadPattern("a_shape", 4, 20), HeadPattern("a_shape", 100, 200)
    chosen, recalls = search_layer(q, k, last_q=8, block=block, target=0.0, candidates=[big, small])
    assert all(p == small for p in chosen.values())  # every head passes a 0 target: the cheaper one
    # the recall of `small`, pair by pair: softmax over the causal keys, summed inside the A-shape mask
    from megactx.attention.sparse.estimate import VerticalSlash
    vs = VerticalSlash(torch.arange(4).expand(h, -1), torch.arange(20).expand(h, -1))
    mask = _naive_vs_mask(vs, m - r, r, block, m)
    for head in range(h):
        want = 0.0
        for i in range(r):
            p = m - r + i
            a = torch.softmax((k[head // 2, :p + 1] @ q[i, head]) * d ** -0.5, 0)
            want += float(a[mask[head, i, :p + 1]].sum())
        assert abs(recalls[head] - want / r) < 1e-4
    chosen, recalls = search_layer(q, k, last_q=8, block=block, target=1.0, candidates=[small, big])
    assert all(p == big for p in chosen.values()) and all(abs(x - 1) < 1e-4 for x in recalls.values())


def test_search_writes_every_head_and_resumes_per_layer(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    llm = LLM(path, max_model_len=512, sparse=False)
    ids = token_ids(300)
    out = str(tmp_path / "sparse.json")
    layers_done = []
    run_search(llm, ids, out, rows=64, last_q=16, block=32, on_layer=layers_done.append)
    assert layers_done == [0, 1]
    cfg = load_patterns(out)
    assert len(cfg.layers) == 2 and all(len(layer) == 4 for layer in cfg.layers)
    data = json.load(open(out))
    assert all(0 <= e[3] <= 1 for layer in data for e in layer.values())
    json.dump(data[:1], open(out, "w"))  # as if stopped after layer 0
    layers_done.clear()
    run_search(llm, ids, out, rows=64, last_q=16, block=32, on_layer=layers_done.append)
    assert layers_done == [1] and len(json.load(open(out))) == 2


def test_refine_recall_is_one_for_full_budgets_and_raises_the_others(tiny_dir, tmp_path):
    path = tiny_dir("qwen2")
    start = tmp_path / "start.json"
    full, tiny = ["vertical_and_slash", 4096, 4096, 0], ["a_shape", 1, 1, 0]
    start.write_text(json.dumps([{"0": full, "1": tiny, "2": tiny, "3": full}] * 2))
    out = str(tmp_path / "refined.json")

    def make(config):
        return LLM(path, max_model_len=512, sparse=True, sparse_threshold=0, sparse_config=config,
                   sparse_dense_tail=0, sparse_block_size=32, max_num_batched_tokens=128, sparse_max_density=1.0,
                   sparse_estimate_span=64)  # each 128-token chunk planned in two parts
    run_refine(make, token_ids(400), str(start), out, threshold=0.999, step=2048, passes=1)
    data = json.load(open(out))
    for layer in data:
        for head in ("0", "3"):
            assert layer[head][:3] == full[:3] and abs(layer[head][3] - 1) < 1e-4
        for head in ("1", "2"):
            assert layer[head][3] < 0.999  # one key and one diagonal lose attention mass
            assert layer[head][:3] == ["vertical_and_slash", 1 + 2048, 1 + 2048]


def test_search_cli_stays_within_the_trained_length(tiny_dir, tmp_path):
    from test_errors import cli
    path = tiny_dir("llama")  # trained to 512 positions
    out = tmp_path / "searched.json"
    r = cli("sparse", "search", path, "--length", "512", "--out", str(out))
    assert r.returncode == 2 and "use --length 511 or less" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = cli("sparse", "search", path, "--length", "511", "--rows", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert len(load_patterns(str(out)).layers) == 2
