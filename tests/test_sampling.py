"""The sampler's processors against transformers' logits processors (the oracle) and hand computations."""
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from megactx.errors import RequestError
from megactx.sampling import SamplingParams, apply_penalties, filter_logits, sample_one


def rand_logits(seed=0, v=200):
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kw,proc", [
    ({"top_k": 7}, TopKLogitsWarper(7)),
    ({"top_p": 0.8}, TopPLogitsWarper(0.8)),
    ({"top_p": 0.3}, TopPLogitsWarper(0.3)),
    ({"min_p": 0.05}, MinPLogitsWarper(0.05)),
])
def test_filters_match_transformers(kw, proc):
    for seed in range(5):
        logits = rand_logits(seed)
        ours = filter_logits(logits.clone(), SamplingParams(**kw))
        ref = proc(torch.zeros(1, 1, dtype=torch.long), logits.clone()[None])[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))


def test_repetition_penalty_matches_transformers():
    logits = rand_logits(1)
    prompt, output = [3, 5, 7, 5], [11, 3, 150]
    ours = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=1.3), prompt, output)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone()[None])[0]
    torch.testing.assert_close(ours, ref)


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.zeros(10)
    out = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 2], [4, 4, 4, 6])
    expected = torch.zeros(10)
    expected[4] = -(0.5 + 3 * 0.25)
    expected[6] = -(0.5 + 0.25)
    torch.testing.assert_close(out, expected)  # prompt tokens 1, 2 are not penalised (OpenAI's rule)


def test_greedy_top_k_1_and_seeded_sampling():
    logits = rand_logits(2)
    assert sample_one(logits, SamplingParams(temperature=0), [], [], None).token_id == int(logits.argmax())
    assert sample_one(logits, SamplingParams(temperature=5.0, top_k=1), [], [], None).token_id == int(logits.argmax())

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_one(logits, SamplingParams(temperature=1.5), [], [], g).token_id for _ in range(20)]
    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_one(logits, SamplingParams(), [], [], g).token_id
                                          for _ in range(3000)]), minlength=3) / 3000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


def test_logprobs_are_the_raw_distribution():
    logits = rand_logits(3)
    tok = sample_one(logits, SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0), [int(logits.argmax())],
                     [], None)
    ref = torch.log_softmax(logits, -1)
    assert tok.logprob == pytest.approx(float(ref[tok.token_id]), abs=1e-5)
    assert [t for t, _ in tok.top_logprobs] == ref.topk(3).indices.tolist()


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": -1}, {"n": 0},
                                {"min_p": 2}, {"presence_penalty": 3}, {"logprobs": 50}, {"top_k": -5}])
def test_bad_sampling_parameters_are_rejected_with_the_value(kw):
    with pytest.raises(RequestError, match=list(kw)[0]):
        SamplingParams(**kw)
