"""The coalescer under real threads: every caller gets its own answer, concurrent calls share
batches (never across keys, never above max_batch), one bad item fails only its own call, and
announced callers are waited for while leaving callers are not."""

from __future__ import annotations

import threading
import time

import pytest

from anime2vec.index.coalesce import Coalescer


class Recorder:
    """execute() that records its batches, takes `delay` seconds and rejects the item "bad"."""

    def __init__(self, delay: float = 0.02):
        self.delay, self.batches = delay, []
        self.entered = threading.Event()

    def __call__(self, key, items):
        self.batches.append((key, list(items)))
        self.entered.set()
        time.sleep(self.delay)
        if "bad" in items:
            raise ValueError("bad item")
        return [f"{key}/{i}" for i in items]


def run_all(c: Coalescer, calls: list[tuple[str, object]]) -> dict[int, object]:
    out: dict[int, object] = {}

    def one(j, key, item):
        try:
            out[j] = c.run(key, item)
        except ValueError as e:
            out[j] = e

    threads = [threading.Thread(target=one, args=(j, k, i)) for j, (k, i) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    return out


def test_concurrent_calls_share_batches_and_each_gets_its_own_answer():
    ex = Recorder()
    c = Coalescer(ex, max_batch=8)
    out = run_all(c, [("k", i) for i in range(40)])
    assert out == {i: f"k/{i}" for i in range(40)}
    sizes = [len(items) for _, items in ex.batches]
    assert sum(sizes) == 40 and max(sizes) <= 8
    assert len(ex.batches) < 40 and max(sizes) > 1  # calls piled up behind a running batch


def test_a_bad_item_fails_only_its_own_call():
    ex = Recorder()
    c = Coalescer(ex, max_batch=16)
    out = run_all(c, [("k", "bad" if i == 3 else i) for i in range(20)])
    assert isinstance(out[3], ValueError)
    assert {j: v for j, v in out.items() if j != 3} == {i: f"k/{i}" for i in range(20) if i != 3}
    with pytest.raises(ValueError, match="bad item"):  # alone, too
        c.run("k", "bad")
    assert c.run("k", 1) == "k/1"  # and the coalescer still works


def test_calls_with_different_keys_never_share_a_batch():
    ex = Recorder()
    c = Coalescer(ex, max_batch=16)
    calls = [("v1" if i % 2 else "v2", i) for i in range(30)]
    out = run_all(c, calls)
    assert out == {j: f"{k}/{i}" for j, (k, i) in enumerate(calls)}
    for key, items in ex.batches:
        assert all((key == "v1") == (i % 2 == 1) for i in items)


def test_max_batch_one_runs_every_call_alone():
    ex = Recorder(delay=0.005)
    c = Coalescer(ex, max_batch=1)
    with c.expect():  # a no-op then: nobody waits
        pass
    out = run_all(c, [("k", i) for i in range(10)])
    assert out == {i: f"k/{i}" for i in range(10)}
    assert [len(items) for _, items in ex.batches] == [1] * 10


def announced_caller(c: Coalescer, then=None) -> tuple[threading.Thread, threading.Event]:
    """A thread inside c.expect() (already counted when this returns) that, once the returned
    event is set, calls then() and leaves."""
    announced, go = threading.Event(), threading.Event()

    def body():
        with c.expect():
            announced.set()
            go.wait(10)
            if then is not None:
                then()

    t = threading.Thread(target=body)
    t.start()
    assert announced.wait(10)
    return t, go


def test_a_leader_waits_for_an_announced_caller_and_not_for_one_that_left():
    ex = Recorder(delay=0.0)
    c = Coalescer(ex, max_batch=8, max_wait_s=30.0)
    result = {}

    t, go = announced_caller(c, then=lambda: result.__setitem__("late", c.run("k", "late")))
    leader = threading.Thread(target=lambda: result.__setitem__("first", c.run("k", "first")))
    leader.start()
    time.sleep(0.2)
    assert ex.batches == []  # the leader is waiting for the announced caller
    go.set()
    t.join(10)
    leader.join(10)
    assert result == {"late": "k/late", "first": "k/first"}
    assert [sorted(items) for _, items in ex.batches] == [["first", "late"]]  # one batch

    # a caller that announces itself and leaves without running releases the leader at once,
    # not after max_wait_s (30 s: the join below would time out)
    t, leave = announced_caller(c)
    leader = threading.Thread(target=lambda: result.__setitem__("second", c.run("k", "second")))
    leader.start()
    time.sleep(0.1)
    leave.set()
    leader.join(10)
    t.join(10)
    assert not leader.is_alive() and result["second"] == "k/second"


def test_a_caller_with_nobody_announced_runs_at_once():
    ex = Recorder(delay=0.0)
    c = Coalescer(ex, max_batch=8, max_wait_s=30.0)
    done = threading.Event()
    t = threading.Thread(target=lambda: (c.run("k", 1), done.set()))
    t.start()
    assert done.wait(10)  # would take 30 s if it waited for company
    t.join()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        Coalescer(Recorder(), max_wait_s=-1)
