"""The encoder killed (SIGKILL) under load and started again on the same port.

tests/e2e/test_outage.py checks what an encoder that is stopped cleanly leaves working. Here it dies
mid-load and comes back, and nothing else is restarted:
- favourites and similar queries keep succeeding throughout;
- free text answers UNAVAILABLE with reason ENCODER_UNAVAILABLE and RetryInfo while it is down
  (never INTERNAL, never a hang), and succeeds again once it is back: the gateway's channel to the
  encoder reconnects by itself;
- the ranker's own encoder channel reconnects too: AddAnime works again.
"""

from __future__ import annotations

import time

import grpc
import pytest

from anime2vec.v1 import common_pb2, gateway_pb2
from tests.e2e.support import AUTH, Stack
from tests.load.support import ClosedLoop, Outcome, gateway_mix, kill9, wait_until

pytestmark = pytest.mark.faults

S = common_pb2
OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
GUARD_S = 120  # hang guards for each phase (the encoder loads MiniLM), not timing assertions


def count(outcomes: list[Outcome], kind: str, code: grpc.StatusCode, reason: str = "") -> int:
    return sum(o.kind == kind and o.code == code and o.reason == reason for o in outcomes)


def test_free_text_fails_precisely_while_the_encoder_is_down_and_recovers_without_restarts(stack: Stack):
    others = {name: stack.procs[name].proc for name in ("gateway", "ranker")}
    kinds, make = gateway_mix(stack.gateway, kinds=("recommend", "search", "similar"), timeout_s=30)
    with ClosedLoop(kinds, make, concurrency=3, pause_s=0.05) as load:
        load.wait_for(lambda o: count(o, "search", OK) >= 3, GUARD_S, "load under way")
        kill9(stack.procs["encoder"])
        down = len(load.snapshot())
        load.wait_for(
            lambda o: (
                count(o[down:], "search", UNAVAILABLE, "ENCODER_UNAVAILABLE") >= 3
                and count(o[down:], "recommend", OK) >= 3
                and count(o[down:], "similar", OK) >= 3
            ),
            GUARD_S,
            "free text fails, favourites and similar work",
        )
        stack.start("encoder")  # same port
        back, serving_at = len(load.snapshot()), time.monotonic()
        load.wait_for(lambda o: count(o[back:], "search", OK) >= 3, GUARD_S, "free text works again")
    outcomes = load.snapshot()
    first = next(o.at for o in outcomes[back:] if o.kind == "search" and o.code == OK)
    print(f"\nfree text answered {max(0.0, first - serving_at):.1f} s after the encoder reported SERVING")

    failed = [o for o in outcomes if o.code != OK]
    assert all(o.kind == "search" for o in failed), {(o.kind, o.code.name, o.reason) for o in failed}
    odd = {
        (o.code.name, o.reason, o.message[:100])
        for o in failed
        if (o.code, o.reason) != (UNAVAILABLE, "ENCODER_UNAVAILABLE") or not o.retry_after_s
    }
    assert not odd, f"free text failed otherwise than UNAVAILABLE/ENCODER_UNAVAILABLE with RetryInfo: {odd}"
    assert all(p.poll() is None and stack.procs[n].proc is p for n, p in others.items()), "nothing else restarted"

    # the ranker (never restarted) reaches the new encoder for AddAnime
    def added() -> bool:
        try:
            stack.gateway.AddAnime(
                gateway_pb2.AddAnimeRequest(
                    anime=S.AnimeInput(title="Encoder Returns", synopsis="A show added after the encoder came back.")
                ),
                metadata=AUTH,
                timeout=60,
            )
            return True
        except grpc.RpcError as e:
            assert e.code() == UNAVAILABLE, e
            return False

    wait_until(added, GUARD_S, "AddAnime works again", every_s=1.0)
