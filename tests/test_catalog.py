"""The live item catalog: record decoding and batching (pure), and a real worker following `item-catalog`."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from scenestream.index import ItemIndex
from scenestream.stream.core.config import StreamConfig
from scenestream.stream.live.catalog import CATALOG_REASONS, CatalogUpdate, apply_updates, collapse, decode_update
from scenestream.stream.core.events import Event, Rejection, encode
from scenestream.stream.live.produce import produce_lines

from .conftest import run
from .test_api import get, metric_values, recs, wait_ready
from .test_hostile_input import HOSTILE

SCENES = ("video", "article", "shop")
CFG = StreamConfig(scenes=SCENES)
D = 4
REJECTED = "scenestream_catalog_records_total{outcome=rejected}"


def rec(**kw) -> bytes:
    return json.dumps(kw).encode()


def test_decode_accepts_upserts_cold_starts_and_deletes():
    assert decode_update(rec(item_id="a", scene="shop", vector=[1, 2, 3, 4.5]), CFG, D) == \
        CatalogUpdate("a", "shop", (1.0, 2.0, 3.0, 4.5))
    assert decode_update(rec(item_id="a", scene="video"), CFG, D) == CatalogUpdate("a", "video")
    assert decode_update(rec(item_id="a", op="delete"), CFG, D) == CatalogUpdate("a", delete=True)


@pytest.mark.parametrize("raw", [
    None, b"", b"{", b"[1]", b"\xff", rec(scene="shop"), rec(item_id="", scene="shop"), rec(item_id=7, scene="shop"),
    rec(item_id="a" * 300, scene="shop"), rec(item_id="a", scene="podcast"), rec(item_id="a"),
    rec(item_id="a", op="rename"), rec(item_id="a", scene="shop", vector=[1, 2, 3]),
    rec(item_id="a", scene="shop", vector=[1, 2, 3, "4"]), rec(item_id="a", scene="shop", vector=[1, 2, 3, True]),
    b'{"item_id": "a", "scene": "shop", "vector": [1, 2, 3, NaN]}', rec(item_id="a", scene="shop", vector="x"),
])
def test_decode_rejects_bad_records_with_a_reason(raw):
    out = decode_update(raw, CFG, D)
    assert isinstance(out, Rejection) and out.reason in CATALOG_REASONS and out.detail   # tests/test_hostile_input.py


def test_collapse_keeps_each_items_last_record():
    ups = [CatalogUpdate("a", "shop", (1.0,) * D), CatalogUpdate("b", "shop"), CatalogUpdate("a", delete=True),
           CatalogUpdate("c", delete=True), CatalogUpdate("c", "video"), CatalogUpdate("b", "video")]
    upserts, deletes = collapse(ups)
    assert deletes == ["a"]
    assert {u.item_id: u.scene for u in upserts} == {"c": "video", "b": "video"}


def test_apply_updates_adds_cold_starts_replaces_and_removes():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(30, D)).astype(np.float32)
    ids, scenes = [f"i{n}" for n in range(30)], [SCENES[n % 3] for n in range(30)]
    idx = ItemIndex.build(ids, scenes, vecs)
    shop_mean = vecs[[n for n in range(30) if scenes[n] == "shop"]].mean(0)
    done = apply_updates(idx, [CatalogUpdate("new", "shop"), CatalogUpdate("i0", delete=True),
                               CatalogUpdate("i1", "article", (9.0, 9.0, 9.0, 9.0)),
                               CatalogUpdate("ghost", delete=True)])
    assert done == {"upserted": 2, "deleted": 1}
    assert len(idx) == 30
    assert "i0" not in idx and "new" in idx
    np.testing.assert_allclose(idx.scores(np.eye(D), ["new"])[:, 0], shop_mean, atol=1e-5)
    top = idx.search(np.ones((1, D), dtype=np.float32), scene="article", k=1)[0]
    assert top[0][0] == "i1"
    assert all(i != "i0" for i, _ in idx.search(vecs[:1], k=30)[0])


@pytest.mark.timeout(300)
def test_published_item_is_recommendable_within_five_seconds_and_a_deleted_one_never_again(
        broker, worker_factory):
    w = worker_factory().start()
    wait_ready(w)
    user, scene = "catalog-user", "shop"
    clicks = [Event(f"cat-{n}", user, f"shop-{n}", scene, "view", 1_700_000_000_000 + n) for n in range(5)]
    run(produce_lines(broker.bootstrap, w.topics["clicks"], [encode(e) for e in clicks], progress=False))
    deadline = time.monotonic() + 30
    while (recs(w, user, scene=scene)[1].get("freshness") or {}).get("newest_ts") != clicks[-1].ts:
        assert time.monotonic() < deadline, w.log_text()
        time.sleep(0.2)
    vector = np.asarray(get(f"{w.api}/users/{user}/interests")[1]["fused"][scene], dtype=np.float64)
    items_before = get(w.api + "/readyz")[1]["items"]

    def publish(*records):
        run(produce_lines(broker.bootstrap, w.topics["catalog"], [json.dumps(r).encode() for r in records],
                          progress=False, key_field="item_id"))

    def listed(item):
        status, body = recs(w, user, scene=scene, k=10)
        assert status == 200, body
        return item in [i["item_id"] for i in body["items"]]

    # aligned with the user's vector and longer than any item: it must rank first once it is in the index
    publish({"item_id": "brand-new", "scene": scene, "vector": list(vector * 100.0)},
            {"item_id": "cold-start", "scene": scene})
    t0 = time.monotonic()
    while not listed("brand-new"):
        assert time.monotonic() - t0 < 5.0, "published item not recommendable within 5 s\n" + w.log_text()
        time.sleep(0.05)
    assert recs(w, user, scene=scene, k=1)[1]["items"][0]["item_id"] == "brand-new"
    assert get(w.api + "/readyz")[1]["items"] == items_before + 2   # the cold-start item is in the index too

    # hostile records (tests/test_hostile_input.py) are refused with their reason, counted, and change nothing
    hostile = [p for p, _ in HOSTILE if p is not None]
    count = lambda: metric_values(get(w.api + "/metrics")[1].decode()).get(REJECTED, 0)  # noqa: E731
    rejected_before = count()
    run(produce_lines(broker.bootstrap, w.topics["catalog"], hostile, progress=False, key_field="item_id"))
    t0 = time.monotonic()
    while count() < rejected_before + len(hostile):
        assert time.monotonic() - t0 < 10.0, w.log_text()
        time.sleep(0.1)
    assert count() == rejected_before + len(hostile)
    assert get(w.api + "/readyz")[1]["items"] == items_before + 2 and listed("brand-new")
    logged = "".join(p.read_text(errors="replace") for p in w.log_dir.glob(f"{w.app_id}-*"))
    assert "refused: unknown_scene: scene 'podcast'" in logged and "refused: oversized: " in logged, w.log_text()

    publish({"item_id": "brand-new", "op": "delete"})
    t0 = time.monotonic()
    while listed("brand-new"):
        assert time.monotonic() - t0 < 5.0, "deleted item still recommended after 5 s"
        time.sleep(0.05)
    # clicks on the deleted item (stale clients) move the user's vector and make the item "popular" for the
    # fallback; it still never comes back, for this user or for an unknown one
    late = [Event(f"cat-late-{n}", f"fan-{n}", "brand-new", scene, "buy", clicks[-1].ts + 1) for n in range(20)]
    late.append(Event("cat-late", user, "shop-99", scene, "buy", clicks[-1].ts + 1))
    run(produce_lines(broker.bootstrap, w.topics["clicks"], [encode(e) for e in late], progress=False))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        for who in (user, "nobody-knows-me"):
            for params in ({"scene": scene}, {}):
                body = recs(w, who, k=50, exclude_seen="false", **params)[1]
                assert "brand-new" not in [i["item_id"] for i in body["items"]], body
        time.sleep(0.1)
    # a restarted worker rebuilds its index from the catalog topic: the deletion and the additions hold
    w.kill()
    w.start()
    wait_ready(w)
    assert get(w.api + "/readyz")[1]["items"] == items_before + 1
    for who in (user, "nobody-knows-me"):
        body = recs(w, who, k=50, exclude_seen="false")[1]
        assert "brand-new" not in [i["item_id"] for i in body["items"]], body
    assert listed("cold-start") or "cold-start" in [i["item_id"] for i in recs(w, user, scene=scene, k=1000)[1]["items"]]
