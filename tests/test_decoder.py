"""The decoder is total: any bytes give an Event or a Rejection with a reason, never an exception."""
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.config import StreamConfig
from stream.events import REASONS, Event, Rejection, decode, derive_event_id

CFG = StreamConfig()
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "scene": "video", "action": "like", "ts": 1_767_225_600_000}


def enc(obj) -> bytes:
    return json.dumps(obj).encode()


def test_a_valid_event_round_trips():
    assert decode(enc(GOOD), CFG) == Event("e1", "u1", "i1", "video", "like", 1_767_225_600_000)


def test_defaults_and_derived_ids():
    base = {k: v for k, v in GOOD.items() if k not in ("event_id", "action")}
    e = decode(enc({**base, "extra": [1, 2]}), CFG)
    assert isinstance(e, Event) and e.action == "click"
    assert e.event_id == derive_event_id("u1", "i1", "video", "click", GOOD["ts"])
    assert decode(enc(base), CFG).event_id == e.event_id
    assert decode(enc({**base, "ts": GOOD["ts"] + 1}), CFG).event_id != e.event_id


@pytest.mark.parametrize("payload,reason", [
    (b"x" * 5000, "oversized"),
    (b"\xff\xfe{}", "not_utf8"),
    (b'{"user_id": ', "bad_json"),
    (json.dumps(GOOD).replace(str(GOOD["ts"]), "NaN").encode(), "non_finite"),
    (b"[1, 2]", "not_object"),
    (enc({k: v for k, v in GOOD.items() if k != "item_id"}), "missing_field"),
    (enc({**GOOD, "ts": "1767225600000"}), "wrong_type"),
    (enc({**GOOD, "ts": True}), "wrong_type"),
    (enc({**GOOD, "ts": 1.5e12}), "wrong_type"),
    (enc({**GOOD, "user_id": ""}), "empty_field"),
    (enc({**GOOD, "item_id": "i" * 129}), "too_long"),
    (enc({**GOOD, "user_id": "u\n1"}), "bad_chars"),
    (enc({**GOOD, "scene": "podcast"}), "unknown_scene"),
    (enc({**GOOD, "action": "share"}), "unknown_action"),
    (enc({**GOOD, "ts": 1_767_225_600}), "ts_out_of_range"),
])
def test_each_reason(payload, reason):
    got = decode(payload, CFG)
    assert isinstance(got, Rejection) and got.reason == reason and got.detail


def _malformed(rng: random.Random):
    """A payload that is certainly invalid, drawn from the ways producers get it wrong."""
    obj = dict(GOOD, event_id=f"e{rng.randrange(10**6)}")
    kind = rng.randrange(12)
    field = rng.choice(["user_id", "item_id", "scene", "action", "ts", "event_id"])
    if kind == 0:
        obj.pop(rng.choice(["user_id", "item_id", "scene", "ts"]))
    elif kind == 1:
        wrong = [None, True, 1.5, [], {}, [obj.get(field)], 10**30, -1, {"$": 1}]
        if field in ("ts",):
            wrong = [None, True, "1", [], {}, 1.5, 10**30, -5]
        obj[field] = rng.choice([w for w in wrong if not (field == "action" and w is None)])
    elif kind == 2:
        obj[rng.choice(["user_id", "item_id", "event_id"])] = rng.choice(["", "x" * rng.randrange(129, 400),
                                                                         "a\x00b", "tab\there", "\ud800"])
    elif kind == 3:
        obj["scene"] = rng.choice(["", "VIDEO", "podcast", " video"])
    elif kind == 4:
        obj["action"] = rng.choice(["", "share", "CLICK"])
    elif kind == 5:
        obj["ts"] = rng.choice([0, -1, 10**18, 1_767_225_600, 4_102_444_800_001])
    elif kind == 6:
        return json.dumps(obj).replace(str(obj["ts"]), rng.choice(["NaN", "Infinity", "-Infinity"])).encode()
    elif kind == 7:
        return rng.choice([b"[", b"{" * 100_000, b"[" * 3000 + b"]" * 3000, b"", b"null", b"42", b'"s"', b"[]"])
    elif kind == 8:
        return json.dumps(obj).encode()[: rng.randrange(0, 40)]
    elif kind == 9:
        raw = bytearray(json.dumps(obj).encode())
        raw.insert(rng.randrange(len(raw)), rng.choice([0xff, 0xc3, 0x80, 0xfe]))
        return bytes(raw)
    elif kind == 10:
        return json.dumps({**obj, "pad": "x" * rng.randrange(4096, 9000)}).encode()
    else:
        raw = bytearray(json.dumps(obj).encode())
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    return json.dumps(obj).encode("utf-8", "surrogatepass")


def test_ten_thousand_malformed_payloads_each_get_a_reason():
    rng = random.Random(0)
    counted, reasons = 0, set()
    while counted < 12_000:
        raw = _malformed(rng)
        got = decode(raw, CFG)
        if isinstance(got, Event):  # a random byte flip can land on a still-valid payload; not counted
            continue
        assert isinstance(got, Rejection) and got.reason in REASONS and got.reason != "decoder_error", (raw, got)
        assert got.detail
        counted += 1
        reasons.add(got.reason)
    assert counted >= 10_000
    assert reasons >= set(REASONS) - {"decoder_error"}


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_without_raising(raw):
    got = decode(raw, CFG)
    assert isinstance(got, (Event, Rejection))
    if isinstance(got, Rejection):
        assert got.reason != "decoder_error"


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                       max_size=6)))
def test_any_json_value_decodes_without_raising(value):
    try:
        raw = json.dumps(value).encode()
    except (ValueError, UnicodeEncodeError):
        return
    assert isinstance(decode(raw, CFG), (Event, Rejection))
