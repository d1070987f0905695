"""End to end on the bundled SmolLM2 GGUF: exact agreement with transformers on the same file, and the
generation controls (stop strings, stop tokens, EOS, max_tokens, seed, n, logprobs, chat)."""

import pytest
import torch

from megactx import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, dtype="fp32", weight_dtype="fp32")  # exact comparisons with transformers in fp32


@pytest.fixture(scope="module")
def hf_smollm2(hf_smollm2_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(hf_smollm2_dir, dtype=torch.float32).eval()


PROMPT = "The three primary colors are"


def test_last_token_logits_and_32_token_greedy_match_transformers(llm, hf_smollm2):
    ids = llm.tokenizer.encode(PROMPT)
    ours = torch.cat([x for _, x in llm.engine.iter_logits(ids)])[-1]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0, -1].float()
        ref_out = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.token_ids == ref_out[0, len(ids):].tolist()
    assert out.finish_reason == "length" and out.usage.completion_tokens == 32


def test_default_fp16_weight_storage_stays_close_to_fp32(llm, smollm2_path):
    fast = LLM(smollm2_path, dtype="fp32")  # auto: fp16 storage of the dequantized Q4_1 weights
    assert fast.engine.runner.weight_dtype == torch.float16
    ids = llm.tokenizer.encode(PROMPT * 20)
    ref = torch.cat([x for _, x in llm.engine.iter_logits(ids)])
    got = torch.cat([x for _, x in fast.engine.iter_logits(ids)])
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.98
    # greedy continuations agree until a near tie of the fp32 model, if any (fp16 logits can flip only those)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5)
    ours, ref = fast.generate(PROMPT, params)[0], llm.generate(PROMPT, params)[0]
    diff = [i for i, (a, b) in enumerate(zip(ours.token_ids, ref.token_ids)) if a != b]
    if diff:
        top = dict(ref.outputs[0].logprobs[diff[0]].top_logprobs)
        assert ours.token_ids[diff[0]] in top
        assert top[ref.token_ids[diff[0]]] - top[ours.token_ids[diff[0]]] < 0.05


def test_bf16_compute_runs_in_bf16_and_stays_close_to_fp32(llm, smollm2_path):
    # --dtype bf16: the layers compute in bf16 (the rotary tables used to promote everything back to fp32)
    fast = LLM(smollm2_path, dtype="bf16")
    seen = []
    layers = fast.engine.runner.model.model.layers
    hooks = [layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype))),
             layers[0].self_attn.o_proj.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype,)))]
    ids = llm.tokenizer.encode(PROMPT * 20)
    got = torch.cat([x for _, x in fast.engine.iter_logits(ids)])
    for h in hooks:
        h.remove()
    assert seen and all(d == torch.bfloat16 for dtypes in seen for d in dtypes)
    ref = torch.cat([x for _, x in llm.engine.iter_logits(ids)])
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.05 * ref.abs().max()  # 0.019 measured
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95  # 1.0 measured


def test_stop_string_across_a_token_boundary(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = llm.generate(PROMPT, params)[0]
    pieces = [llm.tokenizer.decode([t]) for t in base.token_ids]
    # a stop string made of the end of token 5 and the start of token 6
    k = next(i for i in range(4, 20) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    prefix_len = len("".join(pieces[:k + 1])) - 2
    assert base.text.find(stop) == prefix_len
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == base.text[:prefix_len]
    kept = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0]
    assert kept.text == base.text[:prefix_len + len(stop)]


def test_stop_token_ids_eos_and_max_tokens(llm):
    base = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert len(base.token_ids) == 10 and base.finish_reason == "length"
    stop_tok = base.token_ids[4]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]))[0]
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
    chat = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=64))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in chat.text and chat.text.strip()


def test_seed_n_and_logprobs(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, n=2, logprobs=2)
    a, b = llm.generate(PROMPT, params)[0], llm.generate(PROMPT, params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids  # the two choices differ
    assert a.usage.completion_tokens == sum(len(o.token_ids) for o in a.outputs)
    lp = a.outputs[0].logprobs
    assert len(lp) == len(a.outputs[0].token_ids) and all(len(x.top_logprobs) == 2 for x in lp)
    assert all(x.logprob <= 0 and x.top_logprobs[0][1] >= x.top_logprobs[1][1] for x in lp)


def test_chat_answers_and_usage_counts_the_template(llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=20))[0]
    assert "Paris" in out.text
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode_chat(msgs))
    prefill = llm.chat(msgs + [{"role": "assistant", "content": "The capital of France is"}],
                       SamplingParams(temperature=0, max_tokens=5), continue_final_message=True)[0]
    assert prefill.text.strip().startswith("Paris")
