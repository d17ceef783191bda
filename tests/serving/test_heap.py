"""A service's heap settled (anime2vec/serving/heap.py), in a fresh interpreter each (freezing the
test runner's own heap would change every other test): start-up objects frozen out of the cyclic
collector, an old bundle's cycles still collected at the swap, and nothing done where nothing
was settled."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, weakref
    from anime2vec.serving import heap

    class Bundle:  # a loaded version: reachable, and in a reference cycle with itself
        def __init__(self):
            self.me = self

    heap.resettle()  # never settled: a no-op
    assert gc.get_freeze_count() == 0

    served = Bundle()
    alive = weakref.ref(served)
    heap.settle()
    assert gc.get_freeze_count() > 1000, gc.get_freeze_count()  # the interpreter's start-up, the module, the bundle
    assert not any(o is served for o in gc.get_objects())  # frozen: full collections skip it

    served = None  # swapped out: only its own cycle keeps it
    gc.collect()
    assert alive() is not None  # frozen objects are never collected ...
    heap.resettle()
    assert alive() is None  # ... until the swap thaws, collects and freezes again
    assert gc.get_freeze_count() > 1000
    print("ok")
    """
)


def test_settled_heap_skips_startup_objects_and_a_swap_collects_the_old_version():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
