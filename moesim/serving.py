"""Requests and continuous batching: token budget, chunked prefill, KV admission, preemption.

Request state lives in numpy arrays (one entry per request), and every scheduling decision is
vectorised over requests and attention groups, so a step costs a few numpy calls whatever the
batch size. Requests are assigned to attention data-parallel groups round-robin in arrival
order (SGLang's default for DP attention). Each group has its own token budget per step, limit
on running requests and KV cache; all groups step together (the MoE all-to-all synchronises
them).

Scheduling per step and group (vLLM-v1-style, first come first served):

1. KV check: a running request reserves KV for ``prompt + generated + 1`` tokens (its sequence
   so far plus the token this step produces). If a group's reservations exceed its capacity,
   its most recently admitted requests are preempted (recompute: their KV is dropped and they
   re-enter the front of the queue to prefill prompt and generated tokens again).
2. Every running request whose prefill is complete decodes one token.
3. Running requests still prefilling take chunks of the remaining budget, oldest first.
4. Waiting requests are admitted in queue order while the group has room for another running
   request, KV for its whole sequence so far, and budget left (with ``chunked_prefill`` off,
   budget for its whole prompt); admission stops at the first that does not fit.

A step that completes a request's prefill samples its next token; a request finishes when it
has produced ``output_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.workload import Workload

PENDING, WAITING, RUNNING, DONE = 0, 1, 2, 3
_EMPTY = np.zeros(0, dtype=np.int64)


class ServingError(MoesimError):
    """A workload the serving configuration can never run (e.g. a request larger than the KV)."""


@dataclass
class Batch:
    """The work of one forward step: decode tokens and prefill chunks."""

    dec_idx: np.ndarray  # requests decoding one token
    pre_idx: np.ndarray  # requests prefilling a chunk
    pre_start: np.ndarray  # first sequence position of each chunk
    pre_len: np.ndarray  # tokens of each chunk

    @property
    def num_decode(self) -> int:
        return len(self.dec_idx)

    @property
    def num_prefill(self) -> int:
        return int(self.pre_len.sum())

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.num_prefill

    def empty(self) -> bool:
        return self.num_tokens == 0


def grouped_exclusive_cumsum(groups: np.ndarray, values: np.ndarray, num_groups: int) -> np.ndarray:
    """For items in order, the sum of ``values`` of earlier items of the same group."""
    return Grouping(groups, num_groups).exclusive_cumsum(values)


class Grouping:
    """Items in order with a group each; sorts them by group once for several running sums."""

    def __init__(self, groups: np.ndarray, num_groups: int):
        self.order = np.argsort(groups, kind="stable")
        g = groups[self.order]
        first = np.searchsorted(g, np.arange(num_groups))  # index of each group's first item
        self.first_of_item = first[g]

    def exclusive_cumsum(self, values: np.ndarray) -> np.ndarray:
        """For each item, the sum of ``values`` of earlier items of its group."""
        if len(values) == 0:
            return np.zeros(0, dtype=values.dtype)
        v = values[self.order]
        cum = np.cumsum(v)
        excl = cum - v
        out = np.empty_like(excl)
        out[self.order] = excl - excl[self.first_of_item]
        return out


class Scheduler:
    """Continuous batching over ``num_groups`` attention groups (see the module docstring)."""

    QUEUE_HEAD_MIN = 64  # smallest queue prefix admission looks at (a fixed cost below it)

    def __init__(self, workload: Workload, num_groups: int, max_tokens_per_step: int,
                 max_running: int, kv_capacity_tokens: int, chunked_prefill: bool = True,
                 role: str = "colocated"):
        n = len(workload)
        self.n = n
        self.num_groups = num_groups
        self.max_tokens = int(max_tokens_per_step)
        self.max_running = int(max_running)
        self.kv_capacity = int(kv_capacity_tokens)
        self.chunked = chunked_prefill
        self.role = role
        self.arrival = workload.arrival_s
        self.prompt = workload.prompt_tokens.astype(np.int64)
        self.output = workload.output_tokens.astype(np.int64)
        self.group = np.arange(n, dtype=np.int64) % num_groups
        self.state = np.full(n, PENDING, dtype=np.int8)
        # a request's prefill covers sequence positions [0, target); recompute raises target
        self.target = self.prompt.copy()
        self.prefilled = self.prompt.copy() if role == "decode" else np.zeros(n, dtype=np.int64)
        # prefill positions of the current pass that were never computed here (decode role:
        # the prompt's KV arrives with the request); 0 after a preemption
        self.credited = self.prefilled.copy()
        self.generated = np.zeros(n, dtype=np.int64)
        self.first_token_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.admitted_s = np.full(n, np.nan)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.finish_count = np.zeros(n, dtype=np.int64)
        self.running = _EMPTY  # request ids in admission order
        self.waiting = _EMPTY  # request ids in queue order
        self.next_arrival = 0  # first request not yet arrived (arrivals are sorted)
        self.num_done = 0
        # token accounting for the invariants: every computed prefill token is either part of
        # a request's last prefill pass (target - credited) or was thrown away by a preemption
        self.prefill_tokens = 0
        self.recompute_tokens = 0
        self.tokens_produced = 0
        self._check_fits()
        # a group can never outgrow its KV when its fullest batch of the longest requests fits
        self.kv_never_full = self.max_running * int((self.prompt + self.output).max(initial=0)) \
            <= self.kv_capacity

    def _check_fits(self) -> None:
        need = self.prompt + self.output
        worst = int(np.argmax(need))
        if need[worst] > self.kv_capacity:
            raise ServingError(
                f"request {worst} needs KV for {int(need[worst])} tokens but an attention group "
                f"holds {self.kv_capacity}; add GPUs, shorten requests or raise memory limits"
            )
        if not self.chunked and self.role == "colocated":
            longest = int(self.prompt.max())
            if longest > self.max_tokens:
                raise ServingError(
                    f"a {longest}-token prompt exceeds max_tokens_per_step={self.max_tokens} with "
                    "chunked_prefill off; turn chunked_prefill on or raise the budget"
                )

    # ----- time ----------------------------------------------------------------------------
    def arrive_until(self, now: float) -> None:
        """Queue every request that has arrived by ``now``."""
        end = int(np.searchsorted(self.arrival, now, side="right"))
        if end > self.next_arrival:
            new = np.arange(self.next_arrival, end, dtype=np.int64)
            self.state[new] = WAITING
            self.waiting = np.concatenate([self.waiting, new])
            self.next_arrival = end

    def next_arrival_time(self) -> float | None:
        return float(self.arrival[self.next_arrival]) if self.next_arrival < self.n else None

    @property
    def all_done(self) -> bool:
        return self.num_done == self.n

    # ----- forming a step --------------------------------------------------------------------
    def _reserved(self, ids: np.ndarray) -> np.ndarray:
        return self.prompt[ids] + self.generated[ids] + 1

    def _preempt_over_capacity(self) -> None:
        run = self.running
        if len(run) == 0 or self.kv_never_full:
            return
        used = np.bincount(self.group[run], weights=self._reserved(run), minlength=self.num_groups)
        over = np.flatnonzero(used > self.kv_capacity)
        if len(over) == 0:
            return
        victims = []
        for g in over:  # rare: only groups whose KV overflowed
            members = run[self.group[run] == g]
            excess = used[g] - self.kv_capacity
            for rid in members[::-1]:  # newest first
                if excess <= 0:
                    break
                victims.append(rid)
                excess -= self.prompt[rid] + self.generated[rid] + 1
        victims = np.array(victims, dtype=np.int64)
        self.running = run[~np.isin(run, victims)]
        self.state[victims] = WAITING
        self.preemptions[victims] += 1
        # computed prefill tokens thrown away with the KV (they are computed again)
        self.recompute_tokens += int((self.prefilled[victims] - self.credited[victims]).sum())
        self.target[victims] = self.prompt[victims] + self.generated[victims]
        self.prefilled[victims] = 0
        self.credited[victims] = 0
        # preempted requests go to the front of the queue, oldest first
        self.waiting = np.concatenate([np.sort(victims), self.waiting])

    def form_batch(self, now: float = 0.0) -> Batch:
        """Choose the decode tokens and prefill chunks of the step starting at ``now``."""
        self._preempt_over_capacity()
        G = self.num_groups
        run = self.running
        rem_run = self.target[run] - self.prefilled[run]
        decoding = rem_run <= 0
        dec = run[decoding]
        budget = self.max_tokens - np.bincount(self.group[dec], minlength=G)
        pre_ids, pre_len = run[~decoding], rem_run[~decoding]
        if len(pre_ids):
            pre_len, budget = self._allot(pre_ids, pre_len, budget)
        if len(self.waiting) and len(run) < self.max_running * G and budget.max() > 0:
            adm, adm_len, budget = self._admit(run, budget, now)
            if len(adm):
                now_decoding = adm_len == 0
                dec = np.concatenate([dec, adm[now_decoding]])
                pre_ids = np.concatenate([pre_ids, adm[~now_decoding]])
                pre_len = np.concatenate([pre_len, adm_len[~now_decoding]])
        keep = pre_len > 0
        pre_ids, pre_len = pre_ids[keep], pre_len[keep]
        return Batch(dec, pre_ids, self.prefilled[pre_ids], pre_len)

    def _allot(self, ids: np.ndarray, rem: np.ndarray, budget: np.ndarray):
        """Give requests (in order) chunks of their group's remaining budget."""
        g = self.group[ids]
        before = grouped_exclusive_cumsum(g, rem, self.num_groups)
        left = budget[g] - before
        if self.chunked:
            chunk = np.clip(left, 0, rem)
        else:  # a recompute pass longer than the whole budget is still split
            rem = np.minimum(rem, self.max_tokens)
            chunk = np.where(left >= rem, rem, 0)
            # no chunking: the queue stops at the first prompt that does not fit
            blocked = grouped_exclusive_cumsum(g, (chunk == 0).astype(np.int64), self.num_groups)
            chunk = np.where(blocked > 0, 0, chunk)
        return chunk, budget - np.bincount(g, weights=chunk, minlength=self.num_groups).astype(np.int64)

    def _queue_head(self, free: np.ndarray) -> int:
        """Length of the shortest queue prefix holding each group's first ``free[g]`` waiting
        requests (or the whole queue): nobody behind them can be admitted this step."""
        W = len(self.waiting)
        P = min(W, max(2 * int(free.sum()), self.QUEUE_HEAD_MIN))
        while P < W:
            have = np.bincount(self.group[self.waiting[:P]], minlength=self.num_groups)
            if (have >= free).all():
                break
            P = min(W, 2 * P)
        return P

    def _admit(self, run: np.ndarray, budget: np.ndarray, now: float):
        G = self.num_groups
        n_run = np.bincount(self.group[run], minlength=G)
        head = self._queue_head(np.maximum(self.max_running - n_run, 0))
        cand, rest = self.waiting[:head], self.waiting[head:]
        g = self.group[cand]
        rem = self.target[cand] - self.prefilled[cand]
        if not self.chunked:  # a recompute pass longer than the whole budget is still split
            rem = np.minimum(rem, self.max_tokens)
        cost = np.maximum(rem, 1)  # a request arriving with its KV (decode role) decodes at once
        kv_used = np.bincount(self.group[run], weights=self._reserved(run), minlength=G)
        kv_need = self._reserved(cand)
        by_group = Grouping(g, G)
        count_ok = by_group.exclusive_cumsum(np.ones_like(cand)) + 1 <= (self.max_running - n_run)[g]
        kv_ok = by_group.exclusive_cumsum(kv_need) + kv_need <= (self.kv_capacity - kv_used)[g]
        spent = by_group.exclusive_cumsum(cost)
        if self.chunked:
            budget_ok = spent < budget[g]
        else:
            budget_ok = spent + cost <= budget[g]
        ok = count_ok & kv_ok & budget_ok
        # first come first served: nothing behind a request that cannot be admitted
        blocked = by_group.exclusive_cumsum((~ok).astype(np.int64))
        ok &= blocked == 0
        if not ok.any():
            return _EMPTY, _EMPTY, budget
        adm = cand[ok]
        self.waiting = np.concatenate([cand[~ok], rest]) if len(rest) else cand[~ok]
        self.state[adm] = RUNNING
        first_admission = adm[np.isnan(self.admitted_s[adm])]
        self.admitted_s[first_admission] = now
        self.running = np.concatenate([run, adm])
        left = budget[g[ok]] - spent[ok]
        chunk = np.clip(left, 0, rem[ok]) if self.chunked else rem[ok]
        used = np.bincount(g[ok], weights=np.maximum(chunk, (rem[ok] == 0).astype(np.int64)),
                           minlength=G).astype(np.int64)
        return adm, chunk.astype(np.int64), budget - used

    # ----- completing a step ---------------------------------------------------------------
    def finish_step(self, batch: Batch, now: float) -> np.ndarray:
        """Advance requests after the step ending at ``now``; return the requests that finished."""
        self.prefill_tokens += batch.num_prefill
        self.prefilled[batch.pre_idx] += batch.pre_len
        completed = batch.pre_idx[self.prefilled[batch.pre_idx] >= self.target[batch.pre_idx]]
        producers = np.concatenate([batch.dec_idx, completed])
        self.generated[producers] += 1
        self.tokens_produced += len(producers)
        first = producers[np.isnan(self.first_token_s[producers])]
        self.first_token_s[first] = now
        done = producers[self.generated[producers] >= self.output[producers]]
        if len(done):
            self._mark_done(done, now)
            self.running = self.running[self.state[self.running] == RUNNING]
        return done

    def _mark_done(self, done: np.ndarray, finish_s) -> None:
        """Requests ``done`` finish at ``finish_s`` (seconds, or the engine's step stamps)."""
        self.state[done] = DONE
        self.finish_s[done] = finish_s
        self.finish_count[done] += 1
        self.num_done += len(done)

    # ----- views ------------------------------------------------------------------------------
    def prefill_accounted(self) -> int:
        """Prefill tokens the requests' passes account for (equals prefill_tokens when done)."""
        return int((self.target - self.credited).sum()) + self.recompute_tokens

    def kv_used(self) -> np.ndarray:
        """KV tokens reserved per group now."""
        run = self.running
        return np.bincount(self.group[run], weights=self._reserved(run), minlength=self.num_groups)

    # ----- fast-forward support (moesim.engine windows of steps) ---------------------------------
    def steady_steps(self, batch: Batch) -> int:
        """How many steps after ``batch`` (just finished, nobody done) ``form_batch`` would
        return exactly ``batch`` again: 0 unless the batch is pure decode of every running
        request and nobody can be admitted; then the steps until a request's last token or,
        when the KV can fill, until the fullest group would need a preemption.

        Exact: with no prefill, no admission and no preemption, a step only raises every
        running request's ``generated`` by one, which changes none of ``form_batch``'s
        decisions before a request finishes or a group's KV reservations overflow.
        """
        dec = batch.dec_idx
        if len(batch.pre_idx) or len(dec) == 0 or len(dec) != len(self.running):
            return 0
        G = self.num_groups
        if len(self.waiting) and len(dec) < self.max_running * G:
            return 0  # admission might go ahead (budget and KV would decide): general path
        steps = int((self.output[dec] - self.generated[dec]).min())
        if not self.kv_never_full:
            g = self.group[dec]
            used = np.bincount(g, weights=self._reserved(dec), minlength=G)
            n = np.bincount(g, minlength=G)
            has = n > 0
            room = (self.kv_capacity - used[has]) // n[has]  # steps j with used + j n <= cap
            steps = min(steps, int(room.min()) + 1 if (room >= 0).all() else 0)
        return max(steps, 0)

    def advance_steady(self, batch: Batch, steps: int, now_last: float) -> np.ndarray:
        """Apply ``steps`` repeats of the pure-decode ``batch`` (``steady_steps`` allows them):
        the same as ``steps`` calls of form_batch + finish_step; a request can only finish at
        the last, which ends at ``now_last``. Returns the requests that finished."""
        dec = batch.dec_idx
        self.generated[dec] += steps
        self.tokens_produced += steps * len(dec)
        done = dec[self.generated[dec] >= self.output[dec]]
        if len(done):
            self._mark_done(done, now_last)
            self.running = self.running[self.state[self.running] == RUNNING]
        return done

    _PER_REQUEST = ("state", "target", "prefilled", "credited", "generated", "first_token_s",
                    "finish_s", "admitted_s", "preemptions", "finish_count")
    _SCALARS = ("running", "waiting", "next_arrival", "num_done", "prefill_tokens",
                "recompute_tokens", "tokens_produced")

    def snapshot(self) -> dict:
        """The scheduling state (arrived requests only: the others cannot change before the
        next ``arrive_until``), for ``restore``."""
        end = self.next_arrival
        snap = {k: getattr(self, k)[:end].copy() for k in self._PER_REQUEST}
        snap.update({k: getattr(self, k) for k in self._SCALARS})  # arrays are never mutated
        return snap

    def restore(self, snap: dict) -> None:
        end = snap["next_arrival"]
        for k in self._PER_REQUEST:
            getattr(self, k)[:end] = snap[k]
        for k in self._SCALARS:
            setattr(self, k, snap[k])

    @property
    def closed_decode(self) -> bool:
        """Decode instance whose KV never fills and whose token budget never binds: requests
        arrive with their prompt's KV, nobody is ever preempted or prefills, and each group
        admits its next waiting requests (in arrival order) into every free running slot at
        once. ``decode_window`` then steps many steps at once."""
        return self.role == "decode" and self.kv_never_full and self.max_tokens >= self.max_running

    def decode_window(self, W: int) -> dict | None:
        """Run up to ``W`` steps of a ``closed_decode`` scheduler at once, with no arrival; the
        same decisions as ``W`` calls of form_batch + finish_step (stamps -(j + 1) as in the
        engine's windows). Each group is a FIFO queue with ``max_running`` slots: a request
        finishing at the end of step f frees its slot for the group's next waiting request at
        step f + 1, which decodes (and produces its first token) at once. Returns the steps'
        requests as intervals (id, first step, last step, generated at its first step) and
        the counts the engine records, or None when the first step would be empty."""
        G, M = self.num_groups, self.max_running
        run, wait = self.running, self.waiting
        # the queue of each group, in order (the waiting queue stays in arrival order)
        wg = self.group[wait]
        order = np.argsort(wg, kind="stable")
        qstart = np.searchsorted(wg[order], np.arange(G + 1))
        queues = wait[order]
        heads = qstart[:-1].tolist()
        ends = qstart[1:].tolist()
        rem = (self.output[run] - self.generated[run]).tolist()  # steps left, >= 1
        heaps: list[list] = [[] for _ in range(G)]
        for gid, r in zip(self.group[run].tolist(), rem, strict=True):
            heaps[gid].append(r - 1)  # the step at whose end the slot frees
        import heapq

        out_q = self.output
        adm_id, adm_step = [], []
        for g in range(G):
            h = heaps[g]
            h.extend([-1] * (M - len(h)))  # free slots: available at step 0
            heapq.heapify(h)
            q, qe = heads[g], ends[g]
            while q < qe:
                f = h[0]
                if f + 1 >= W:
                    break
                rid = int(queues[q])
                q += 1
                adm_id.append(rid)
                adm_step.append(f + 1)
                heapq.heapreplace(h, f + int(out_q[rid]))
        adm_id = np.array(adm_id, dtype=np.int64)
        adm_step = np.array(adm_step, dtype=np.int64)
        # every request active in the window: (id, first step, last step, generated at first)
        ids = np.concatenate([run, adm_id])
        first = np.concatenate([np.zeros(len(run), dtype=np.int64), adm_step])
        gen0 = np.concatenate([self.generated[run], np.zeros(len(adm_id), dtype=np.int64)])
        last_needed = first + self.output[ids] - gen0 - 1  # step of its last token
        n_steps = W
        if len(ids) == 0:
            return None
        # the window ends before the first step with nothing to run (empty batch)
        cover = np.zeros(W + 1, dtype=np.int64)
        np.add.at(cover, first, 1)
        np.add.at(cover, np.minimum(last_needed, W - 1) + 1, -1)
        running_n = np.cumsum(cover[:W])
        empty = np.flatnonzero(running_n == 0)
        if len(empty):
            n_steps = int(empty[0])
            if n_steps == 0:
                return None
            keep = first < n_steps
            ids, first, gen0, last_needed = ids[keep], first[keep], gen0[keep], last_needed[keep]
            adm_keep = adm_step < n_steps
            adm_id, adm_step = adm_id[adm_keep], adm_step[adm_keep]
        last = np.minimum(last_needed, n_steps - 1)
        finished = last_needed <= n_steps - 1
        steps_run = last - first + 1
        # state after the window
        self.generated[ids] += steps_run
        self.tokens_produced += int(steps_run.sum())
        self.state[adm_id] = RUNNING
        fresh = adm_id[np.isnan(self.admitted_s[adm_id])]
        self.admitted_s[fresh] = -(adm_step[np.isnan(self.admitted_s[adm_id])] + 1.0)
        no_first = np.isnan(self.first_token_s[ids])
        self.first_token_s[ids[no_first]] = -(first[no_first] + 1.0)
        self._mark_done(ids[finished], -(last[finished] + 1.0))
        adm_order = np.lexsort((adm_id, adm_step))
        new_running = np.concatenate([run, adm_id[adm_order]])
        self.running = new_running[self.state[new_running] == RUNNING]
        # admitted requests leave the queue (a prefix of each group's queue)
        taken = np.bincount(self.group[adm_id], minlength=G)
        rank = np.empty(len(wait), dtype=np.int64)
        rank[order] = np.arange(len(wait)) - qstart[:-1][wg[order]]
        self.waiting = wait[rank >= taken[wg]]
        # per-step counts recorded after each step's finish
        fin = np.bincount(last[finished], minlength=n_steps)[:n_steps]
        adm = np.bincount(adm_step, minlength=n_steps)[:n_steps]
        return {"n": n_steps, "ids": ids, "first": first, "last": last, "gen0": gen0,
                "running": running_n[:n_steps] - fin,
                "waiting": len(wait) - np.cumsum(adm)}
