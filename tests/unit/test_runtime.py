"""Service processes tune the cyclic garbage collector once start-up is done."""

from __future__ import annotations

import gc

from sessionmgr.common.runtime import GC_THRESHOLDS, tune_gc


def test_start_up_objects_are_frozen_and_young_ones_collected_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 1000, "what start-up made is out of the collector's sight"
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
