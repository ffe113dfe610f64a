"""wsicodec.heap: freed heap memory handed back between units of work, at most so often."""

import pytest

from wsicodec import heap


def test_release_is_throttled_process_wide(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append(0) or (lambda pad: 1))
    monkeypatch.setattr(heap, "_last", -float("inf"))
    assert heap.release_freed_memory(60.0) is True
    assert heap.release_freed_memory(60.0) is False          # too soon after the last
    assert heap.release_freed_memory(0.0) is True
    assert len(calls) == 2


def test_release_without_malloc_trim_does_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    monkeypatch.setattr(heap, "_last", -float("inf"))
    assert heap.release_freed_memory(0.0) is False


def test_the_c_library_trims_where_it_has_malloc_trim(monkeypatch):
    if heap._malloc_trim() is None:
        pytest.skip("no malloc_trim in this C library (glibc has it)")
    monkeypatch.setattr(heap, "_last", -float("inf"))
    assert heap.release_freed_memory(0.0) is True
