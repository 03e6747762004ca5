"""Replay cuts the evaluated part of a log into micro-batches as the worker would at the log's own pace, and its
rounds give the figures and records of the plain micro-batch loop."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scenestream.index import ItemIndex
from scenestream.model.checkpoint import Checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.model.config import ModelConfig
from scenestream.model.model import InterestModel
from scenestream.model.vocab import ItemVocab
from scenestream.stream.offline import replay as replay_module
from scenestream.stream.core.output import interest_records
from scenestream.stream.core.config import DEFAULT_ACTIONS
from scenestream.stream.core.events import Event
from scenestream.stream.core.popularity import Popularity, RunningTop
from scenestream.stream.offline.logs import LoadedEvents, time_cutoff
from scenestream.stream.offline.replay import micro_batches, replay, rounds
from scenestream.stream.datasets.synthetic import SyntheticSpec, generate

from .reference import apply_batch


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


@given(steps=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 9)), max_size=80),
       depth=st.integers(1, 6), k=st.integers(1, 5), skip=st.sets(st.integers(0, 9), max_size=6))
def test_running_top_ranks_as_popularity_ranked(steps, depth, k, skip):
    """RunningTop keeps only `depth` items ranked, yet answers as Popularity.ranked over all counts, at every step."""
    top, pop = RunningTop(depth), Popularity()
    skip = {f"i{n}" for n in skip}
    for scene, n in steps:
        e = Event("e", "u", f"i{n}", scene, "click", 0)
        top.add([e])
        pop.add([e])
        for s in "ab":
            assert top.first(s, k, skip) == [i for i, _ in pop.ranked(s) if i not in skip][:k]


@given(batches=st.lists(st.sets(st.integers(0, 5), min_size=1, max_size=3), max_size=30))
def test_rounds_keep_each_users_batches_in_order_and_apart(batches):
    plan = rounds(batches)
    assert sorted(n for r in plan for n in r) == list(range(len(batches)))
    where = {n: r for r, ns in enumerate(plan) for n in ns}
    for r in plan:
        assert r == sorted(r)
    for a in range(len(batches)):
        for b in range(a + 1, len(batches)):
            if batches[a] & batches[b]:
                assert where[a] < where[b]


# ---- replay in rounds == the plain micro-batch loop ---------------------------------------------------------

SPEC = SyntheticSpec(users=40, seed=3, items_per_scene=30, topics=4, events_per_user=25, days=3)
K = 3  # of 30 items a scene: a top-K that the vectors and the counts decide


@pytest.fixture(scope="module")
def tiny_world():
    """A small log and a random (untrained, not tiny) model over its catalog: enough for vectors that differ. One
    thread each for torch and faiss meanwhile: at this size thread hand-offs dominate (and starve on a busy machine)."""
    import faiss
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    events, world = generate(SPEC)
    torch.manual_seed(2)
    vocab = ItemVocab(world.item_ids, [world.item_scene[i] for i in world.item_ids])
    cfg = ModelConfig(n_items=len(vocab), n_scenes=len(SPEC.scenes), n_actions=len(DEFAULT_ACTIONS),
                      d_model=16, n_heads=2, n_layers=2, span=3, dropout=0.0, scene_layers=0)
    model = InterestModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ckpt = Checkpoint(model.eval(), vocab, SPEC.scenes, DEFAULT_ACTIONS, 8, "test")
    yield LoadedEvents(events, SPEC.scenes, DEFAULT_ACTIONS), ckpt
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[1])


def reference(loaded, encoder, index, batch_size, wait_ms, k=K, eval_cutoff=0.5):
    """The plain loop: score each micro-batch event by event, apply it, encode it, count it."""
    cutoff_ts = time_cutoff(loaded.events, eval_cutoff)
    state, live, records, pop = {}, {}, {}, Popularity()
    hits = {"live": 0, "stale": 0, "popular": 0}
    late = 0

    def step(batch):
        nonlocal late
        out = apply_batch(state.get, batch, encoder.window)
        state.update(out.updates)
        late += out.late_dropped
        for rec in interest_records(encoder, out.updates):
            records[rec["user_id"]] = rec
            live[rec["user_id"]] = np.stack([rec["fused"][s] for s in encoder.scenes])
        pop.add(batch)

    for batch in micro_batches([e for e in loaded.events if e.ts < cutoff_ts], batch_size, 0):
        step(batch)
    stale = dict(live)
    after = [e for e in loaded.events if e.ts >= cutoff_ts]
    for batch in micro_batches(after, batch_size, wait_ms):
        for e in batch:
            seen = {x.item_id for x in state.get(e.user_id, {}).get(e.scene, ())}
            popular = [i for i, _ in pop.ranked(e.scene) if i not in seen][:k]
            hits["popular"] += e.item_id in popular
            for method, vectors in (("live", live), ("stale", stale)):
                top = popular
                if e.user_id in vectors:
                    q = vectors[e.user_id][encoder.scenes.index(e.scene)][None]
                    top = [i for i, _ in index.search(q, scene=e.scene, k=k, exclude=[seen])[0]]
                hits[method] += e.item_id in top
        step(batch)
    return hits, len(after), late, records


@pytest.mark.parametrize("batch_size,wait_ms", [(4, 20 * 60_000), (3, 0)])
def test_replay_in_rounds_gives_the_plain_loops_figures_and_records(tiny_world, monkeypatch, batch_size, wait_ms):
    loaded, ckpt = tiny_world
    monkeypatch.setattr(replay_module, "PLAN_EVENTS", 40)     # several stretches, each of several rounds
    monkeypatch.setattr(replay_module, "SEARCH_BATCH", 7)     # searches split and carried across stretches
    index = ItemIndex.build(*InterestEncoder(ckpt).item_vectors())
    after = [e for e in loaded.events if e.ts >= time_cutoff(loaded.events, 0.5)]
    batches = list(micro_batches(after, batch_size, wait_ms))
    plan = rounds([{e.user_id for e in b} for b in batches[:12]])
    assert len(plan) < 12 and max(len(b) for b in batches) > 1   # rounds do merge micro-batches here

    hits, evaluated, late, records = reference(loaded, InterestEncoder(ckpt), index, batch_size, wait_ms)
    got = replay(loaded, InterestEncoder(ckpt), index, batch_size=batch_size, eval_cutoff=0.5, k=K, progress=False,
                 batch_wait_ms=wait_ms)
    assert evaluated > 200 and all(hits.values()) and hits["live"] != hits["stale"]
    assert {m: got.prequential[m][f"recall@{K}"] * evaluated for m in hits} == pytest.approx(hits, abs=1e-6)
    assert all(got.prequential[m]["evaluated"] == evaluated for m in hits)
    assert got.late_dropped == late
    assert got.records.keys() == records.keys()
    for user, rec in records.items():   # the same windows, encoded in other batches: equal up to float rounding
        mine, theirs = _leaves(got.records[user]), _leaves(rec)
        assert mine.keys() == theirs.keys()
        for path, value in theirs.items():
            if value.dtype.kind == "f":
                np.testing.assert_allclose(mine[path], value, atol=1e-5, rtol=0, err_msg=f"{user} {path}")
            else:
                assert np.array_equal(mine[path], value), (user, path)


def _leaves(record, path=()):
    """A record's values by their path of keys, as arrays (vectors are lists or float32 arrays)."""
    if isinstance(record, dict):
        return {p: v for key, value in record.items() for p, v in _leaves(value, (*path, key)).items()}
    return {path: np.asarray(record)}
