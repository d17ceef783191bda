"""The gateway freezes its title index out of the cyclic collector once it is built
(anime2vec/serving/heap.py). The index is built after start-up has settled the heap; left in the
collector's generations, each full collection walked it with every request waiting: ~100 ms every
~10 s at 300 requests/s with the full catalogue (120k objects): most of the gateway's p99 (87 -> 10 ms).
"""

import json

from .support import Stack


def test_the_gateway_settles_its_heap_after_building_the_title_index(stack: Stack):
    lines = stack.procs["gateway"].log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    # this process's records only: the log is appended to when a test restarts the gateway
    started = max(i for i, r in enumerate(records) if r.get("msg") == "serving")
    records = records[started:]
    built = [i for i, r in enumerate(records) if r.get("msg") == "title index built"]
    settled = [i for i, r in enumerate(records) if str(r.get("msg", "")).startswith("heap settled")]
    assert built, "the gateway serves, so its title index was built"
    assert any(i > built[-1] for i in settled), "no heap settled after the title index was built"
