"""Scheduler policy on integers: decodes first, a long prefill shares the budget with newly arrived prompts,
the budget is used up, and preemption never drops a request."""
from megactx.config import SchedulerConfig
from megactx.engine.kv_cache import BlockAllocator
from megactx.engine.scheduler import Scheduler
from megactx.engine.sequence import Sequence, Status
from megactx.sampling import SamplingParams


def _seq(name, prompt_len):
    return Sequence(name, 0, list(range(prompt_len)), SamplingParams(max_tokens=8))


def _apply(out):
    """What the engine does after a step: the chunks are computed, a completed prompt gets a sampled token."""
    for chunk in out.chunks:
        completes = chunk.completes
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if completes:
            chunk.seq.token_ids.append(0)


def _scheduler(budget=64, num_blocks=1000, max_num_seqs=16):
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    return Scheduler(config, BlockAllocator(num_blocks, block_size=4))


def test_short_prompt_arriving_during_long_prefill_starts_at_once_and_budget_is_used():
    sched = _scheduler(budget=64)
    long = _seq("long", 1000)
    sched.add(long)
    _apply(out := sched.schedule())
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("long", 64)]
    short = _seq("short", 10)
    sched.add(short)
    out = sched.schedule()
    # short gets all it needs (less than its half share), long gets the rest: the budget is used up
    assert {c.seq.request_id: c.num_tokens for c in out.chunks} == {"long": 54, "short": 10}
    _apply(out)
    assert short.num_output_tokens == 1 and long.num_computed_tokens == 118
    out = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 63)]


def test_two_long_prompts_share_the_budget():
    sched = _scheduler(budget=64)
    a, b = _seq("a", 500), _seq("b", 500)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert {c.seq.request_id: c.num_tokens for c in out.chunks} == {"a": 32, "b": 32}


def test_decodes_come_first_even_when_admitted_after_a_prefill():
    sched = _scheduler(budget=16)
    long, short = _seq("long", 1000), _seq("short", 4)
    sched.add(short)
    _apply(sched.schedule())  # short prefilled, now decoding
    sched.running.reverse()
    sched.add(long)
    for _ in range(5):
        out = sched.schedule()
        assert ("short", 1) in [(c.seq.request_id, c.num_tokens) for c in out.chunks]
        assert out.num_tokens == 16
        _apply(out)


def test_preemption_requeues_the_latest_and_everything_finishes():
    sched = _scheduler(budget=32, num_blocks=12)  # 48 tokens of KV for three 20-token prompts
    seqs = [_seq(f"s{i}", 20) for i in range(3)]
    for s in seqs:
        sched.add(s)
    preempted = 0
    for _ in range(200):
        if not sched.has_work():
            break
        out = sched.schedule()
        preempted += len(out.preempted)
        assert sum(len(s.block_table) for s in sched.running) <= 12
        _apply(out)
        for s in list(sched.running):
            if s.num_output_tokens >= 8:
                sched.finish(s, "length")
    assert not sched.has_work() and preempted > 0
    assert all(s.status == Status.FINISHED and s.num_output_tokens == 8 for s in seqs)
