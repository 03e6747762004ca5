"""Every index kind keeps the search contract under scope filters, exclusions, live updates and save/load.

The contract: exactly min(k, eligible items in scope) results, each in the scope, none excluded, no duplicates,
scored by the true inner product, best first. ANN kinds are built with deliberately weak settings (nprobe=1,
small graphs) on clustered data so that their short answers exercise the retry and exact-scan fallbacks.
"""
import functools
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenestream.index import IndexSpec, IndexVersionError, ItemIndex, load_index, save_index
from scenestream.index import kinds as kinds_module
from scenestream.index import spec as spec_module
from scenestream.index.spec import scope_kind
from tests.test_index import brute, check

ANN = ["ivf-flat", "ivf-pq", "hnsw"]
KINDS = ["exact", *ANN]
TOL = 1e-4


def weak(kind, **kw):
    return IndexSpec(kind=kind, nlist=64, nprobe=1, hnsw_m=4, ef_search=10, ef_construction=20, pq_m=4,
                     pq_nbits=4, pq_refine=2, min_ann_items=50, **kw)


def clustered(n, d=16, seed=0, n_tiny=5, prefix="i"):
    """Unit vectors around 20 centres; scenes: `n_tiny` items in 'tiny', the rest 'a' (~70%) or 'b'."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    x = centres[rng.integers(20, size=n)] + 0.3 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scenes = ["tiny"] * n_tiny + [str(s) for s in rng.choice(["a", "b"], n - n_tiny, p=[0.7, 0.3])]
    return [f"{prefix}{r}" for r in range(n)], scenes, x.astype(np.float32)


def assert_valid(catalog, q, out, scene, exclude, k):
    """`out` keeps the contract for queries q against catalog {id: (scene, vector)}."""
    assert len(out) == len(q)
    for n, res in enumerate(out):
        eligible = {i for i, (s, _) in catalog.items() if (scene is None or s == scene) and i not in exclude[n]}
        assert len(res) == min(k, len(eligible))
        got = [i for i, _ in res]
        assert len(set(got)) == len(got) and set(got) <= eligible
        scores = np.array([s for _, s in res])
        true = np.array([catalog[i][1] @ q[n] for i in got])
        np.testing.assert_allclose(scores, true, atol=TOL)
        assert np.all(np.diff(scores) <= TOL)


def catalog_of(idx):
    return {i: (s, v) for i, s, v in zip(idx.item_ids, idx.item_scenes, idx.vectors)}


@functools.cache
def built(kind):
    ids, scenes, vecs = clustered(3000)
    return ItemIndex.build(ids, scenes, vecs, weak(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_weak_ann_settings_are_really_ann(kind):
    kinds = built(kind).kinds
    assert kinds[None] == kinds["a"] == kinds["b"] == kind and kinds["tiny"] == "exact"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), scene=st.sampled_from([None, "a", "b", "tiny"]), k=st.integers(1, 80),
       n_q=st.integers(1, 4), n_top=st.integers(0, 120), seed=st.integers(0, 2**32 - 1))
def test_property_exactly_k_in_scope_without_excluded(kind, scene, k, n_q, n_top, seed):
    idx = built(kind)
    catalog = catalog_of(idx)
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n_q, idx.dim)).astype(np.float32)
    ids = np.array(list(catalog))
    exclude = []
    for n in range(n_q):  # the query's true best items (forces ANN retries), random ids, and ids not indexed
        top = [i for i, _ in idx.search(q[n], scene=scene, k=max(n_top, 1))[0]][:n_top]
        exclude.append(set(top) | set(rng.choice(ids, 20).tolist()) | {"ghost"})
    out = idx.search(q, scene=scene, k=k, exclude=exclude)
    assert_valid(catalog, q, out, scene, exclude, k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scene", [None, "a", "tiny"])
def test_search_without_exclusions_keeps_the_contract(kind, scene):
    """The no-exclusion hot path answers as the general path does."""
    idx = built(kind)
    catalog = catalog_of(idx)
    q = np.random.default_rng(2).normal(size=(5, idx.dim)).astype(np.float32)
    for k in (1, 10, 200):
        out = idx.search(q, scene=scene, k=k)
        assert_valid(catalog, q, out, scene, [set()] * len(q), k)
        assert out == idx.search(q, scene=scene, k=k, exclude=[{"ghost"}] * len(q))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_queries_are_refused(kind, bad):
    idx = built(kind)
    q = np.random.default_rng(3).normal(size=(3, idx.dim)).astype(np.float32)
    q[1, 0] = bad
    for exclude in (None, [[], [], []]):
        with pytest.raises(ValueError, match="finite"):
            idx.search(q, k=5, exclude=exclude)


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_only_when_fewer_exist(kind):
    idx = built(kind)
    catalog = catalog_of(idx)
    q = np.random.default_rng(1).normal(size=(2, idx.dim)).astype(np.float32)
    tiny = [i for i, (s, _) in catalog.items() if s == "tiny"]
    b = [i for i, (s, _) in catalog.items() if s == "b"]
    assert idx.search(q, scene="tiny", k=3, exclude=[tiny, []])[0] == []
    for scene, k, exclude in (("tiny", 10, [[], tiny[:1]]), ("b", len(b) + 5, [b[:7], []]), (None, 3000, [b, []])):
        assert_valid(catalog, q, idx.search(q, scene=scene, k=k, exclude=exclude), scene, exclude, k)


def test_scope_kind_rules():
    assert scope_kind(IndexSpec(kind="auto"), 50_000) == "exact"
    assert scope_kind(IndexSpec(kind="auto"), spec_module.AUTO_EXACT_UP_TO + 1) == spec_module.AUTO_ANN_KIND
    assert scope_kind(IndexSpec(kind="hnsw"), 10) == "exact"  # too small to be worth a graph
    assert scope_kind(IndexSpec(kind="ivf-pq"), 5000) == "exact"  # too few to train 2**8-code books
    assert scope_kind(IndexSpec(kind="ivf-pq"), 20_000) == "ivf-pq"
    with pytest.raises(ValueError, match="unknown index kind"):
        IndexSpec(kind="lsh")


@pytest.mark.parametrize("kind", ANN)
def test_tiny_scenes_build_for_every_kind(kind):
    ids, scenes, vecs = clustered(60, n_tiny=1)
    idx = ItemIndex.build(ids, scenes, vecs, IndexSpec(kind=kind, min_ann_items=1))  # IVF must not fail
    q = vecs[:3]
    assert_valid(catalog_of(idx), q, idx.search(q, scene="tiny", k=5), "tiny", [set()] * 3, 5)
    assert_valid(catalog_of(idx), q, idx.search(q, k=70), None, [set()] * 3, 70)


def test_exact_kind_matches_brute_force_after_updates():
    ids, scenes, vecs = clustered(400, seed=3)
    idx = ItemIndex.build(ids, scenes, vecs)
    new_ids, new_scenes, new_vecs = clustered(50, seed=4, n_tiny=0, prefix="n")
    idx.upsert(new_ids + ids[:30], new_scenes + ["c"] * 30, np.vstack([new_vecs, -vecs[:30]]))
    idx.remove(ids[100:160])
    cat = catalog_of(idx)
    c_ids, c_scenes, c_vecs = list(cat), [s for s, _ in cat.values()], np.array([v for _, v in cat.values()])
    q = np.random.default_rng(5).normal(size=(10, 16)).astype(np.float32)
    for scene in (None, "a", "b", "c"):
        for n, res in enumerate(idx.search(q, scene=scene, k=15, exclude=[ids[:5]] * 10)):
            check(res, brute(c_ids, c_scenes, c_vecs, q[n], scene, set(ids[:5])), 15)


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_updates_and_searches(kind):
    """Searches in 3 threads while batches add, replace (moving scenes) and remove items: every search keeps
    the contract, and the final index serves what a fresh build of the final catalog serves."""
    ids, scenes, vecs = clustered(1500, seed=7, n_tiny=0)
    idx = ItemIndex.build(ids, scenes, vecs, weak(kind, rebuild_fraction=0.3))
    truth = {i: (s, v) for i, s, v in zip(ids, scenes, vecs)}
    rng = np.random.default_rng(8)
    errors, done, searched = [], threading.Event(), [0]

    def searcher(seed):
        r = np.random.default_rng(seed)
        while not done.is_set():
            try:
                scene = r.choice([None, "a", "b"])
                q = r.normal(size=(2, 16)).astype(np.float32)
                seen = [set(r.choice(ids, 5).tolist()), set()]
                for n, res in enumerate(idx.search(q, scene=scene, k=10, exclude=seen)):
                    got = [i for i, _ in res]
                    assert len(got) == 10 == len(set(got)) and not set(got) & seen[n]  # scenes keep > 100 items
                searched[0] += 1
            except Exception as exc:  # noqa: BLE001 - any error in a thread fails the test
                errors.append(repr(exc))
                return

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for step in range(20):
            live = list(truth)
            new_ids, new_scenes, new_vecs = clustered(25, seed=100 + step, n_tiny=0, prefix=f"n{step}-")
            moved = rng.choice(live, 20, replace=False).tolist()
            moved_vecs = np.roll(np.array([truth[i][1] for i in moved]), 1, axis=1)
            moved_scenes = rng.choice(["a", "b"], 20).tolist()
            idx.upsert(new_ids + moved, new_scenes + moved_scenes, np.vstack([new_vecs, moved_vecs]))
            truth.update({i: (s, v) for i, s, v in zip(new_ids + moved, new_scenes + moved_scenes,
                                                        np.vstack([new_vecs, moved_vecs]))})
            gone = rng.choice([i for i in truth if i not in moved], 30, replace=False).tolist()
            assert idx.remove(gone + ["ghost"]) == 30
            for i in gone:
                del truth[i]
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors and searched[0] > 0
    assert idx.rebuilds >= 1  # the rebuild-and-swap path ran under concurrent searches
    got = catalog_of(idx)
    assert got.keys() == truth.keys() and len(idx) == len(truth)
    assert all(got[i][0] == truth[i][0] and np.array_equal(got[i][1], truth[i][1]) for i in truth)
    assert idx.scenes == tuple(dict.fromkeys(idx.item_scenes)) and set(idx.scenes) == {"a", "b"}
    fresh = ItemIndex.build(list(truth), [s for s, _ in truth.values()],
                            np.array([v for _, v in truth.values()]), weak(kind))
    exact_index = ItemIndex.build(list(truth), [s for s, _ in truth.values()],
                                  np.array([v for _, v in truth.values()]))
    q = rng.normal(size=(8, 16)).astype(np.float32)
    exclude = [set(rng.choice(list(truth), 40).tolist()) for _ in range(8)]
    for scene in (None, "a", "b"):
        everything = len(truth)
        full = idx.search(q, scene=scene, k=everything, exclude=exclude)
        assert [{i for i, _ in r} for r in full] == \
            [{i for i, _ in r} for r in fresh.search(q, scene=scene, k=everything, exclude=exclude)]
        for x in (idx, fresh):
            x.set_search_knobs(nprobe=10_000, ef_search=5000)
        a, b = (x.search(q, scene=scene, k=10, exclude=exclude) for x in (idx, fresh))
        if kind in ("exact", "ivf-flat"):  # every list probed: IVF-flat is exact too
            assert [[i for i, _ in r] for r in a] == [[i for i, _ in r] for r in b]
            np.testing.assert_allclose([[s for _, s in r] for r in a], [[s for _, s in r] for r in b], atol=TOL)
        else:  # graphs and PQ codes differ between an updated and a fresh index: both must find the true top
            exact = exact_index.search(q, scene=scene, k=10, exclude=exclude)
            for res in (a, b):
                hits = sum(len({i for i, _ in r} & {i for i, _ in e}) for r, e in zip(res, exact))
                assert hits >= 0.9 * sum(len(e) for e in exact)


@pytest.mark.parametrize("kind", KINDS)
def test_removed_item_is_never_returned(kind):
    ids, scenes, vecs = clustered(1200, seed=9)
    idx = ItemIndex.build(ids, scenes, vecs, weak(kind))
    gone = ids[5:45]
    q = vecs[5:45]  # each removed item's own vector: it would be (near) the top
    idx.remove(gone)
    assert len(idx) == 1160 and not set(gone) & set(idx.item_ids)
    for scene in (None, "a", "b"):
        for res in idx.search(q, scene=scene, k=300):
            assert not {i for i, _ in res} & set(gone)
    assert_valid(catalog_of(idx), q, idx.search(q, k=50), None, [set()] * 40, 50)
    with pytest.raises(ValueError, match="unknown item ids"):
        idx.scores(q, gone[:1])
    idx.upsert(gone[:1], ["tiny"], vecs[5:6])  # back, in another scene
    assert gone[0] in {i for i, _ in idx.search(q[0], scene="tiny", k=10)[0]}
    assert gone[0] not in {i for i, _ in idx.search(q[0], scene=scenes[5], k=1000)[0]}


def test_scene_moves_and_emptied_scenes():
    ids, scenes, vecs = clustered(200, seed=11, n_tiny=2)
    idx = ItemIndex.build(ids, scenes, vecs, weak("hnsw"))
    idx.upsert(ids[:2], ["a", "a"], -vecs[:2])  # both tiny items move: the tiny scene is gone
    assert "tiny" not in idx.scenes and idx.item_scenes[idx.item_ids.index(ids[0])] == "a" == idx.scene_of(ids[0])
    idx.remove(ids[2:3])
    assert ids[2] not in idx and not idx.contains(ids[2]) and idx.scene_of(ids[2]) is None and ids[3] in idx
    assert idx.scene_of(ids[3]) == scenes[3]
    np.testing.assert_allclose(idx.scores(vecs[:1], ids[:1]), [[-1.0]], atol=TOL)
    with pytest.raises(ValueError, match="unknown scene 'tiny'"):
        idx.search(vecs[0], scene="tiny")
    # a single-scene catalog shares one index between the scene and all items, until a second scene arrives
    one = ItemIndex.build(ids[2:], ["a"] * 198, vecs[2:], weak("hnsw"))
    one.upsert(["x"], ["z"], vecs[:1])
    assert {i for i, _ in one.search(vecs[0], scene="a", k=500)[0]} == set(ids[2:])
    assert "x" not in {i for i, _ in one.search(vecs[0], scene="a", k=3)[0]}  # x's own vector: it would be top
    assert {i for i, _ in one.search(vecs[0], scene="z", k=5)[0]} == {"x"}
    assert len(one.search(vecs[0], k=500)[0]) == 199


def test_update_input_errors():
    ids, scenes, vecs = clustered(20, seed=12)
    idx = ItemIndex.build(ids, scenes, vecs)
    with pytest.raises(ValueError, match="2-D"):
        idx.upsert(["x"], ["a"], np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="unique"):
        idx.upsert(["x", "x"], ["a", "a"], np.ones((2, 16), np.float32))
    with pytest.raises(ValueError, match="finite"):
        idx.upsert(["x"], ["a"], np.full((1, 16), np.nan, np.float32))
    assert idx.remove(["nope"]) == 0 and len(idx) == 20


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_and_version_check(kind, tmp_path):
    ids, scenes, vecs = clustered(1500, seed=13)
    idx = ItemIndex.build(ids, scenes, vecs, weak(kind))
    idx.remove(ids[10:60])  # tombstones (HNSW) and spent slots must survive the round trip
    idx.upsert(["new"], ["b"], vecs[:1])
    save_index(idx, tmp_path / "ix", model_version="v1")
    back = load_index(tmp_path / "ix", "v1")
    assert (back.item_ids, back.item_scenes, back.scenes, back.kinds, back.spec, len(back)) == \
        (idx.item_ids, idx.item_scenes, idx.scenes, idx.kinds, idx.spec, len(idx))
    np.testing.assert_array_equal(back.vectors, idx.vectors)
    q = np.random.default_rng(14).normal(size=(6, 16)).astype(np.float32)
    for scene in (None, "a", "tiny"):
        exclude = [ids[:20]] * 6
        assert back.search(q, scene=scene, k=25, exclude=exclude) == idx.search(q, scene=scene, k=25,
                                                                                exclude=exclude)
    gone = set(ids[10:60])
    assert back.search(vecs[10:60], k=5) == idx.search(vecs[10:60], k=5)  # removed items' own vectors as queries
    assert not gone & {i for r in back.search(vecs[10:60], k=5) for i, _ in r}
    back.upsert(["later"], ["a"], vecs[1:2])  # a loaded index takes updates
    assert "later" in {i for i, _ in back.search(vecs[1], scene="a", k=1000)[0]}
    with pytest.raises(IndexVersionError, match="built for model v1, checkpoint is v2.*scenestream index build"):
        load_index(tmp_path / "ix", "v2")
    assert issubclass(IndexVersionError, ValueError)
    with pytest.raises(FileNotFoundError):
        load_index(tmp_path / "nothing", "v1")


def test_cold_start_vector():
    ids, scenes, vecs = clustered(300, seed=15)
    idx = ItemIndex.build(ids, scenes, vecs)
    for scene, rows in (("a", [r for r, s in enumerate(scenes) if s == "a"]), ("new-scene", range(300)),
                        (None, range(300))):
        v = idx.cold_start_vector(scene)
        assert v.shape == (16,) and v.dtype == np.float32 and np.isfinite(v).all()
        np.testing.assert_allclose(v, vecs[list(rows)].mean(axis=0), atol=1e-5)
    idx.remove([i for i, s in zip(ids, scenes) if s == "tiny"])
    np.testing.assert_allclose(idx.cold_start_vector("tiny"), idx.vectors.mean(axis=0), atol=1e-5)
    empty = ItemIndex.build([], [], np.zeros((0, 16), np.float32))
    assert np.array_equal(empty.cold_start_vector("a"), np.zeros(16, np.float32))


def test_cli_build_saves_a_loadable_index(tmp_path, monkeypatch):
    """`index build` plumbing, with the checkpoint loader replaced by a fixed catalog (no training here)."""
    from click.testing import CliRunner

    import scenestream.model.checkpoint
    import scenestream.model.infer
    from scenestream.stream.cli.index import index_group

    ids, scenes, vecs = clustered(500, seed=16)

    class Encoder:
        version = "v-test"

        def __init__(self, ckpt):
            assert ckpt == "loaded"

        def item_vectors(self):
            return ids, scenes, vecs

    monkeypatch.setattr(scenestream.model.checkpoint, "load_checkpoint", lambda path, device="cpu": "loaded")
    monkeypatch.setattr(scenestream.model.infer, "InterestEncoder", Encoder)
    out = tmp_path / "ix"
    result = CliRunner().invoke(index_group, ["build", "--checkpoint", "ckpt", "--kind", "ivf-flat", "--nprobe", "3",
                                              "--out", str(out)])
    assert result.exit_code == 0, result.output
    idx = load_index(out, "v-test")
    assert idx.spec.kind == "ivf-flat" and idx.spec.nprobe == 3 and idx.item_ids == ids
    q = vecs[:4]
    assert idx.search(q, k=7) == ItemIndex.build(ids, scenes, vecs, idx.spec).search(q, k=7)
    bad = CliRunner().invoke(index_group, ["build", "--checkpoint", "ckpt", "--kind", "nope", "--out", str(out)])
    assert bad.exit_code != 0


def test_gpu_replica_plumbing(monkeypatch):
    """No GPU faiss here: a CPU clone stands in for faiss.index_cpu_to_gpu, to check that flat and IVF scopes
    search a replica, HNSW never gets one, and updates refresh it (a stale one would return removed items)."""
    import faiss

    import scenestream.index.item_index as item_index_module
    made = []

    def fake_replica(index, kind):
        made.append(kind)
        return faiss.clone_index(index)

    monkeypatch.setattr(kinds_module.faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(item_index_module, "gpu_replica", fake_replica)
    ids, scenes, vecs = clustered(1200, seed=17)
    for kind in KINDS:
        made.clear()
        idx = ItemIndex.build(ids, scenes, vecs, weak(kind, device="auto"))
        top = [i for i, _ in idx.search(vecs[:3], scene="a", k=5)[0]]
        assert "hnsw" not in made and bool(made) == (kind != "hnsw")
        idx.remove(top)
        assert not set(top) & {i for i, _ in idx.search(vecs[:3], scene="a", k=5)[0]}
        assert_valid(catalog_of(idx), vecs[:3], idx.search(vecs[:3], k=5), None, [set()] * 3, 5)
    monkeypatch.setattr(kinds_module.faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(RuntimeError, match="no GPU"):
        ItemIndex.build(ids, scenes, vecs, IndexSpec(device="cuda"))
    assert ItemIndex.build(ids, scenes, vecs, IndexSpec(device="auto")).search(vecs[0], k=1)[0][0][0] == ids[0]
