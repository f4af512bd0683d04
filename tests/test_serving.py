"""Continuous batching: token budget, chunked prefill, admission, KV preemption, invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.serving import DONE, Scheduler, ServingError, grouped_exclusive_cumsum
from moesim.workload import Workload


def wl(prompts, outputs, arrivals=None):
    n = len(prompts)
    arr = np.zeros(n) if arrivals is None else np.asarray(arrivals, float)
    return Workload(arr, np.asarray(prompts, np.int64), np.asarray(outputs, np.int64))


def drive(s: Scheduler, dt: float = 1.0, max_steps: int = 10_000):
    """Run the scheduler with a fixed step time; return the batches."""
    now, batches = 0.0, []
    while not s.all_done and len(batches) < max_steps:
        s.arrive_until(now)
        b = s.form_batch(now)
        if b.empty():
            now = s.next_arrival_time()
            continue
        now += dt
        s.finish_step(b, now)
        batches.append(b)
    return batches


def test_grouped_exclusive_cumsum_matches_a_loop():
    groups = np.array([1, 0, 1, 2, 0, 1])
    values = np.array([5, 3, 2, 7, 1, 4])
    want, seen = [], {}
    for g, v in zip(groups, values, strict=True):
        want.append(seen.get(g, 0))
        seen[g] = seen.get(g, 0) + v
    assert grouped_exclusive_cumsum(groups, values, 3).tolist() == want


def test_chunked_prefill_splits_a_long_prompt_over_the_budget():
    s = Scheduler(wl([10], [2]), 1, max_tokens_per_step=4, max_running=4, kv_capacity_tokens=100)
    batches = drive(s)
    # 10 prompt tokens in chunks 4, 4, 2 (the last chunk samples token 1), then one decode
    assert [b.pre_len.tolist() for b in batches] == [[4], [4], [2], []]
    assert [b.pre_start.tolist() for b in batches[:3]] == [[0], [4], [8]]
    assert [b.num_decode for b in batches] == [0, 0, 0, 1]
    assert s.first_token_s[0] == 3.0 and s.finish_s[0] == 4.0


def test_decode_first_then_prefill_fills_the_leftover_budget():
    # request 0 decodes while request 1 (arriving later) prefills in the leftover budget
    s = Scheduler(wl([2, 6], [5, 1], arrivals=[0.0, 0.5]), 1, 4, 4, 100)
    batches = drive(s)
    assert batches[0].pre_len.tolist() == [2]
    assert batches[1].num_decode == 1 and batches[1].pre_len.tolist() == [3]
    assert batches[2].num_decode == 1 and batches[2].pre_len.tolist() == [3]
    assert s.finish_s[1] == 3.0  # one output token: done when its prefill completes


def test_without_chunking_a_prompt_waits_for_the_whole_budget():
    s = Scheduler(wl([3, 3], [1, 1]), 1, 4, 4, 100, chunked_prefill=False)
    batches = drive(s)
    assert [b.pre_len.tolist() for b in batches] == [[3], [3]]
    with pytest.raises(ServingError, match="chunked_prefill"):
        Scheduler(wl([5], [1]), 1, 4, 4, 100, chunked_prefill=False)


def test_admission_respects_max_running_and_fcfs():
    s = Scheduler(wl([1, 1, 1], [3, 3, 3]), 1, 16, max_running=2, kv_capacity_tokens=100)
    s.arrive_until(0.0)
    b = s.form_batch(0.0)
    assert sorted(b.pre_idx.tolist()) == [0, 1] and s.waiting.tolist() == [2]


def test_round_robin_groups_have_their_own_budgets():
    s = Scheduler(wl([8, 8, 8, 8], [1, 1, 1, 1]), 2, 8, 4, 100)
    s.arrive_until(0.0)
    b = s.form_batch(0.0)
    # groups 0 and 1 each prefill one 8-token prompt this step
    assert sorted(b.pre_idx.tolist()) == [0, 1] and b.pre_len.tolist() == [8, 8]


def test_kv_pressure_preempts_the_newest_and_recomputes():
    # capacity 12: two requests of prompt 4 reserve 5 each; decode growth overflows
    s = Scheduler(wl([4, 4], [6, 6]), 1, 16, 4, kv_capacity_tokens=12)
    drive(s)
    assert s.preemptions.sum() >= 1
    assert (s.generated == s.output).all()
    # recompute: prefill = prompts + KV thrown away + generated tokens prefilled again
    regenerated = int((s.target - s.prompt).sum())
    assert s.prefill_tokens == int(s.prompt.sum()) + s.recompute_tokens + regenerated
    assert s.recompute_tokens > 0 and regenerated > 0


def test_a_request_larger_than_the_kv_is_refused():
    with pytest.raises(ServingError, match="needs KV for 20 tokens"):
        Scheduler(wl([10], [10]), 1, 16, 4, kv_capacity_tokens=19)


def test_decode_role_starts_with_the_prompt_cached():
    s = Scheduler(wl([100], [3]), 1, 4, 4, 200, role="decode")
    batches = drive(s)
    assert [b.num_decode for b in batches] == [1, 1, 1]
    assert s.prefill_tokens == 0 and s.first_token_s[0] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    groups=st.integers(1, 4),
    budget=st.integers(4, 64),
    chunked=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_scheduler_invariants_on_random_workloads(n, groups, budget, chunked, seed):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, budget + 1, n)
    outputs = rng.integers(1, 12, n)
    arrivals = np.sort(rng.exponential(2.0, n).cumsum())
    kv = int((prompts + outputs).max() + rng.integers(0, 40))
    max_running = int(rng.integers(1, budget + 1))
    s = Scheduler(wl(prompts, outputs, arrivals), groups, budget, max_running, kv, chunked)
    now = 0.0
    for _ in range(20_000):
        if s.all_done:
            break
        s.arrive_until(now)
        b = s.form_batch(now)
        if b.empty():
            assert s.next_arrival_time() is not None, "stalled with nothing left to arrive"
            now = max(now, s.next_arrival_time())
            continue
        # per group: budget, running limit and KV reservations hold in every step
        g = s.group
        per_group = (np.bincount(g[b.dec_idx], minlength=groups)
                     + np.bincount(g[b.pre_idx], weights=b.pre_len, minlength=groups))
        assert (per_group <= budget).all()
        assert (np.bincount(g[s.running], minlength=groups) <= max_running).all()
        assert (s.kv_used() <= kv).all()
        assert len(np.intersect1d(b.dec_idx, b.pre_idx)) == 0
        now += 1.0
        s.finish_step(b, now)
    assert s.all_done
    assert (s.state == DONE).all() and (s.finish_count == 1).all()
    assert (s.generated == outputs).all() and s.tokens_produced == outputs.sum()
    regenerated = int((s.target - s.prompt).sum())
    assert s.prefill_tokens == prompts.sum() + s.recompute_tokens + regenerated
    assert (s.first_token_s <= s.finish_s).all() and (s.first_token_s > arrivals).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 120),
    groups=st.integers(1, 5),
    max_running=st.integers(1, 6),
    budget=st.integers(4, 64),
    kv=st.integers(200, 900),
    chunked=st.booleans(),
    role=st.sampled_from(["colocated", "decode"]),
    seed=st.integers(0, 10_000),
)
def test_admission_from_a_queue_prefix_equals_scanning_the_whole_queue(
        n, groups, max_running, budget, kv, chunked, role, seed):
    """The scheduler looks only at each group's first free-slot-many waiting requests; the
    batches are the same as when it scans the whole queue."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, 40, n) if chunked or role == "decode" else rng.integers(1, budget, n)
    outputs = rng.integers(1, 30, n)
    arrivals = np.sort(rng.exponential(0.5, n).cumsum() * rng.integers(0, 2))

    def batches(scan_all: bool):
        s = Scheduler(wl(prompts, outputs, arrivals), groups, budget, max_running, kv, chunked, role)
        s.QUEUE_HEAD_MIN = 1  # make the prefix as short as the rule allows
        if scan_all:
            s._queue_head = lambda free: len(s.waiting)
        return [(b.dec_idx.tolist(), b.pre_idx.tolist(), b.pre_len.tolist()) for b in drive(s)]

    assert batches(False) == batches(True)
