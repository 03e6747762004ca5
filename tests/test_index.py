"""The item index is exact: it returns what a brute-force numpy top-k returns, within scope, minus exclusions."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenestream.index import ItemIndex

TOL = 1e-5


def catalog(n, d, n_scenes, seed=0, ints=False):
    rng = np.random.default_rng(seed)
    ids = [f"i{r}" for r in range(n)]
    scenes = [f"s{rng.integers(n_scenes)}" for _ in range(n)]
    vecs = rng.integers(-2, 3, (n, d)) if ints else rng.uniform(-1, 1, (n, d))  # small ints: many exact ties
    return ids, scenes, vecs.astype(np.float32)


def brute(ids, scenes, vecs, q, scene, excluded):
    """Exact float64 scores of every eligible item for query q, as {item_id: score}."""
    s = vecs.astype(np.float64) @ q.astype(np.float64)
    return {i: s[r] for r, i in enumerate(ids) if (scene is None or scenes[r] == scene) and i not in excluded}


def check(res, eligible, k):
    """res is an exact top-k of `eligible`: right length, valid unique ids, true scores, best first."""
    assert len(res) == min(k, len(eligible))
    got = [i for i, _ in res]
    assert len(set(got)) == len(got) and set(got) <= eligible.keys()
    got_scores = np.array([s for _, s in res])
    np.testing.assert_allclose(got_scores, [eligible[i] for i in got], atol=TOL)
    assert np.all(np.diff(got_scores) <= TOL)
    best = np.sort(np.fromiter(eligible.values(), float))[::-1]
    np.testing.assert_allclose(got_scores, best[:len(res)], atol=TOL)
    if len(best) > k and best[k - 1] - best[k] > 10 * TOL:  # a clear boundary: the id set itself is determined
        assert set(got) == {i for i, v in eligible.items() if v >= best[k - 1] - TOL}


def test_matches_brute_force_global_and_per_scene():
    ids, scenes, vecs = catalog(300, 16, 3, seed=1)
    idx = ItemIndex.build(ids, scenes, vecs)
    q = np.random.default_rng(2).normal(size=(25, 16)).astype(np.float32)
    for scene in (None, *idx.scenes):
        for n, res in enumerate(idx.search(q, scene=scene, k=10)):
            check(res, brute(ids, scenes, vecs, q[n], scene, set()), 10)
            if scene is not None:
                assert all(scenes[ids.index(i)] == scene for i, _ in res)


def test_metadata_and_scores():
    ids, scenes, vecs = catalog(50, 8, 3, seed=3)
    idx = ItemIndex.build(ids, scenes, vecs)
    assert len(idx) == 50 and idx.dim == 8
    assert idx.scenes == tuple(dict.fromkeys(scenes))
    q = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(idx.scores(q, ["i7", "i0"]), q @ vecs[[7, 0]].T, atol=TOL)
    assert idx.scores(q[0], ["i1"]).shape == (1, 1)


def test_one_dimensional_query_and_k_beyond_scope():
    ids, scenes, vecs = catalog(40, 4, 2, seed=5)
    idx = ItemIndex.build(ids, scenes, vecs)
    q = np.ones(4, np.float32)
    out = idx.search(q, k=1000)
    assert len(out) == 1 and sorted(i for i, _ in out[0]) == sorted(ids)
    out = idx.search(q, scene="s1", k=1000, exclude=[["i0", "i1", "nope"]])
    assert {i for i, _ in out[0]} == {i for i, s in zip(ids, scenes) if s == "s1"} - {"i0", "i1"}


def test_exclusion_keeps_k_and_empty_exclude_is_plain_search():
    ids, scenes, vecs = catalog(100, 8, 2, seed=6)
    idx = ItemIndex.build(ids, scenes, vecs)
    q = np.random.default_rng(7).normal(size=(2, 8)).astype(np.float32)
    plain = idx.search(q, k=5)
    assert idx.search(q, k=5, exclude=[]) == plain == idx.search(q, k=5, exclude=[[], set()])
    top = [i for i, _ in plain[0]]
    out = idx.search(q, k=5, exclude=[top, []])
    assert len(out[0]) == 5 and not set(top) & {i for i, _ in out[0]}
    assert out[1] == plain[1]


def test_errors():
    ids, scenes, vecs = catalog(10, 4, 2)
    idx = ItemIndex.build(ids, scenes, vecs)
    q = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="unknown scene 'music'"):
        idx.search(q, scene="music")
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be >= 1"):
            idx.search(q, k=k)
    with pytest.raises(ValueError, match="one entry per query"):
        idx.search(q, exclude=[[], []])
    with pytest.raises(TypeError):
        idx.search(q, exclude=["i1"])
    with pytest.raises(ValueError):
        idx.search(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="finite"):
        idx.search(np.full(4, np.nan, np.float32))
    with pytest.raises(ValueError, match="unique"):
        ItemIndex.build(["a", "a"], ["s", "s"], np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="same length"):
        ItemIndex.build(["a"], ["s", "s"], np.ones((2, 4), np.float32))


def test_empty_catalog():
    idx = ItemIndex.build([], [], np.zeros((0, 4), np.float32))
    assert len(idx) == 0 and idx.scenes == ()
    assert idx.search(np.ones((2, 4), np.float32), k=3) == [[], []]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 60), d=st.integers(1, 8), n_scenes=st.integers(1, 4), n_q=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1), ints=st.booleans(), data=st.data())
def test_property_exact_topk_with_scope_and_exclusion(n, d, n_scenes, n_q, seed, ints, data):
    ids, scenes, vecs = catalog(n, d, n_scenes, seed, ints)
    idx = ItemIndex.build(ids, scenes, vecs)
    scene = data.draw(st.sampled_from((None, *idx.scenes)), label="scene")
    k = data.draw(st.integers(1, n + 3), label="k")
    exclude = data.draw(st.lists(st.lists(st.sampled_from(ids + ["ghost"]), max_size=n + 2),
                                 min_size=n_q, max_size=n_q), label="exclude")
    rng = np.random.default_rng(seed + 1)
    q = (rng.integers(-2, 3, (n_q, d)) if ints else rng.normal(size=(n_q, d))).astype(np.float32)
    out = idx.search(q, scene=scene, k=k, exclude=exclude)
    assert len(out) == n_q
    for n_, res in enumerate(out):
        check(res, brute(ids, scenes, vecs, q[n_], scene, set(exclude[n_])), k)
    assert idx.search(q, scene=scene, k=k, exclude=exclude) == out  # deterministic, ties included
