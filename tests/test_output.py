"""The published record cut from a micro-batch's arrays (stream/core/output.py) and the table of each held user's
newest vectors (stream/core/vector_table.py)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from scenestream.stream.core.events import Event
from scenestream.stream.core.output import (decode_binary, encode_records, record, record_json, records_binary,
                                            records_json)
from scenestream.stream.core.slots import SlotWindows
from scenestream.stream.core.vector_table import VectorTable

SCENES = ("video", "article", "shop")


def vectors(U: int, d: int = 8, seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    has = rng.random((U, len(SCENES))) < 0.6
    has[:, 0] = True
    S = len(SCENES)
    return SimpleNamespace(h=np.where(has[..., None], rng.standard_normal((U, S, d)), 0).astype(np.float32), has=has,
                           recent=rng.standard_normal((U, d)).astype(np.float32),
                           fused=rng.standard_normal((U, S + 1, d)).astype(np.float32),
                           weights=rng.random((U, S + 1, S)).astype(np.float32),
                           newest_ts=rng.integers(0, 2**62, U), events=rng.integers(1, 150, U))


def as_json(rec: dict) -> dict:
    return orjson.loads(record_json(rec))


def test_json_records_cut_from_the_arrays_are_the_records_json():
    vec, users = vectors(20), [f"u{k}" for k in range(20)]
    got = records_json(users, vec, SCENES, "m1")
    want = [record_json(record(u, vec, r, SCENES, "m1")) for r, u in enumerate(users)]
    assert got == want
    one = orjson.loads(got[3])
    assert one["user_id"] == "u3" and set(one["scenes"]) == {s for s, h in zip(SCENES, vec.has[3]) if h}
    assert np.array_equal(np.float32(one["global"]), vec.fused[3, len(SCENES)])   # float32 read back exactly


def test_binary_records_read_back_as_the_json_record():
    vec = vectors(30, d=64, seed=1)
    users = [f"u{k}" for k in range(29)] + ["é\U0001f600 user"]
    for r, raw in enumerate(records_binary(users, vec, SCENES, "a197416bff00")):
        assert as_json(decode_binary(raw)) == as_json(record(users[r], vec, r, SCENES, "a197416bff00"))
    assert encode_records("binary", users, vec, SCENES, "v") == records_binary(users, vec, SCENES, "v")
    assert encode_records("json", users, vec, SCENES, "v") == records_json(users, vec, SCENES, "v")
    raw = records_binary(["u"], vectors(1, d=64), SCENES, "v")[0]
    with pytest.raises(ValueError):
        decode_binary(raw[:-4])
    with pytest.raises(ValueError):
        decode_binary(b"{" + raw[1:])


def test_a_table_row_is_its_holder_s_until_the_slot_changes_hands():
    slots = SlotWindows(SCENES, 4)
    joined = slots.join([Event(f"e{k}", f"u{k}", "i", "video", "click", 1 + k) for k in range(3)])
    users = joined.users
    table = VectorTable(SCENES, 8)
    vec = vectors(3)
    table.put(users, slots.uver[users], vec, np.arange(3), "m1", 5.0)
    u1 = slots.slot_of["u1"]
    assert table.held(u1, slots.uver[u1]) and table.version(u1) == "m1" and table.at[u1] == 5.0
    assert as_json(table.record("u1", u1)) == as_json(record("u1", vec, 1, SCENES, "m1"))
    slots.drop(["u1"])
    slots.join([Event("e9", "u9", "i", "shop", "click", 9)])
    u9 = slots.slot_of["u9"]
    assert u9 == u1                                  # the slot is reused ...
    assert not table.held(u9, slots.uver[u9])        # ... and the row read as absent for its new holder
    assert not table.held(None, 0) and not table.held(10_000, 0)
