"""A serving process's garbage collector: the start-up heap frozen out of full collections (which
stop every thread), nothing already dead kept, and every collection's pause counted."""

from __future__ import annotations

import gc
import weakref

from rtdiff_cluster.gc_pauses import GcPauses, freeze_startup_objects


class _Node:
    def __init__(self):
        self.other = None


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # only the cyclic collector frees these
    return weakref.ref(a)


def test_a_full_collection_is_counted_with_its_seconds():
    pauses = GcPauses.install()
    assert GcPauses.install() is pauses  # one tracker per process
    before_n, before_s = list(pauses.collections), list(pauses.seconds)
    gc.collect(2)
    assert pauses.collections[2] == before_n[2] + 1
    assert pauses.seconds[2] > before_s[2]


def test_freezing_keeps_nothing_already_dead_and_leaves_the_collector_working():
    dead = _cycle()
    kept = _Node()
    try:
        frozen = freeze_startup_objects("test")
        assert dead() is None  # start-up garbage was collected, not frozen
        assert frozen == gc.get_freeze_count() > 0
        # The live start-up objects are out of the collector's generations: full collections skip them.
        assert not any(o is kept for o in gc.get_objects())
        later = _cycle()  # garbage made while serving is still collected
        gc.collect()
        assert later() is None
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
