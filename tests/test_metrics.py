"""The worker's batch-fed histogram reads like prometheus_client's own fed the same values one at a time."""
import numpy as np
from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from scenestream.stream.live.metrics import BatchHistogram

BUCKETS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


def _lines(registry):
    return [line for line in generate_latest(registry).decode().splitlines()
            if not line.startswith("#") and "_created" not in line]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.one_of(st.sampled_from(BUCKETS + (0.0,)),
                                   st.floats(0, 100, allow_nan=False, allow_infinity=False)), max_size=30),
                max_size=6))
def test_batch_histogram_exposes_what_observe_one_at_a_time_does(batches):
    """Values on the bounds themselves are drawn often: each belongs to its own bound's bucket (le)."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    one_by_one = Histogram("lat_seconds", "doc", registry=theirs, buckets=BUCKETS)
    batched = BatchHistogram("lat_seconds", "doc", BUCKETS, ours)
    for batch in batches:
        for v in batch:
            one_by_one.observe(v)
        batched.observe_many(np.array(batch, dtype=np.float64))
    mine, reference = _lines(ours), _lines(theirs)
    names = lambda lines: [line.rsplit(" ", 1)[0] for line in lines]   # noqa: E731
    values = lambda lines: [float(line.rsplit(" ", 1)[1]) for line in lines]   # noqa: E731
    assert names(mine) == names(reference)
    for a, b in zip(values(mine), values(reference)):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(b))   # the sums: added in another order
