"""Replay cuts the evaluated part of a log into micro-batches as the worker would at the log's own pace."""
from hypothesis import given
from hypothesis import strategies as st

from scenestream.stream.core.events import Event
from scenestream.stream.replay import micro_batches


@given(gaps=st.lists(st.integers(0, 500), max_size=60), batch_size=st.integers(1, 8), wait_ms=st.integers(0, 400))
def test_micro_batches_keep_every_event_in_order_and_close_only_when_they_must(gaps, batch_size, wait_ms):
    ts, events = 0, []
    for n, gap in enumerate(gaps):
        ts += gap
        events.append(Event(f"e{n}", "u", "i", "video", "click", ts))
    batches = list(micro_batches(events, batch_size, wait_ms))
    assert [e for b in batches for e in b] == events
    for b, nxt in zip(batches, [*batches[1:], None]):
        assert 1 <= len(b) <= batch_size
        if wait_ms > 0:
            assert b[-1].ts - b[0].ts < wait_ms
        if nxt is not None:  # closed for a reason: full, or the next event is too late for it
            assert len(b) == batch_size or (wait_ms > 0 and nxt[0].ts - b[0].ts >= wait_ms)
