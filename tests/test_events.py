"""The event decoder (stream/core/events.py) against docs/design.md "The event".

Valid payloads decode to the exact Event; every rejection reason has a concrete payload; and a seeded fuzz of more
than ten thousand malformed payloads (plus hypothesis on arbitrary bytes and near-valid JSON) shows `decode` is total:
it never raises, never reports `decoder_error`, and agrees with an independent oracle written in this file.
"""
from __future__ import annotations

import json
import random
import string
import unicodedata
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenestream.stream.core.config import StreamConfig
from scenestream.stream.core.events import REASONS, Event, Rejection, _accept, _judge, decode, derive_event_id, encode

CFG = StreamConfig()
# bad_csv: CSV logs only (test_one_place.py); key_mismatch, ts_in_future: live records only (test_nothing_lost.py)
PAYLOAD_REASONS = set(REASONS) - {"decoder_error", "bad_csv", "key_mismatch", "ts_in_future", "undecodable_batch"}
BIG = replace(CFG, max_payload_bytes=10_000_000)   # no size limit in practice: reaches the JSON parser's limits
TS = 1_767_225_600_000
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "scene": "video", "action": "like", "ts": TS}
REQUIRED = ("user_id", "item_id", "scene", "ts")
ID_FIELDS = ("user_id", "item_id", "event_id")


def enc(obj, **kw) -> bytes:
    return json.dumps(obj, **kw).encode("utf-8", "surrogatepass")


def rejected(raw, reason, cfg=CFG) -> Rejection:
    got = decode(raw, cfg)
    assert isinstance(got, Rejection), (raw[:200], got)
    assert got.reason == reason, (raw[:200], got)
    assert isinstance(got.detail, str) and got.detail
    return got


# ----------------------------------------------------------------------------------------------------------------
# An independent oracle: the rules of docs/design.md, written without the code under test.
# ----------------------------------------------------------------------------------------------------------------

_NONPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}


def _good_id(value, cfg) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= cfg.max_id_chars
            and len(value.encode("utf-8", "surrogatepass")) <= cfg.max_id_bytes
            and all(c == " " or unicodedata.category(c) not in _NONPRINTABLE for c in value))


def _no_constants(name):
    raise ValueError(name)


def oracle(raw: bytes, cfg: StreamConfig = CFG):
    """The Event a payload must decode to, or None when it must be rejected."""
    if len(raw) > cfg.max_payload_bytes:
        return None
    try:
        obj = json.loads(bytes(raw).decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or any(k not in obj for k in REQUIRED):
        return None
    if not (_good_id(obj["user_id"], cfg) and _good_id(obj["item_id"], cfg)):
        return None
    if not (isinstance(obj["scene"], str) and obj["scene"] in cfg.scenes):
        return None
    action = obj.get("action")
    action = cfg.default_action if action is None else action
    if not (isinstance(action, str) and action in cfg.actions):
        return None
    ts = obj["ts"]
    if type(ts) is not int or not cfg.ts_min_ms <= ts <= cfg.ts_max_ms:
        return None
    event_id = obj.get("event_id")
    if event_id is None:
        event_id = derive_event_id(obj["user_id"], obj["item_id"], obj["scene"], action, ts)
    elif not _good_id(event_id, cfg):
        return None
    return Event(event_id, obj["user_id"], obj["item_id"], obj["scene"], action, ts)


# ----------------------------------------------------------------------------------------------------------------
# Valid payloads
# ----------------------------------------------------------------------------------------------------------------

def test_a_valid_event_round_trips_field_by_field():
    got = decode(enc(GOOD), CFG)
    assert got == Event("e1", "u1", "i1", "video", "like", TS)
    assert got.to_json() == GOOD
    assert decode(encode(got), CFG) == got


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like_payloads_are_accepted(kind):
    assert decode(kind(enc(GOOD)), CFG) == Event("e1", "u1", "i1", "video", "like", TS)


def test_action_defaults_to_click():
    base = {k: v for k, v in GOOD.items() if k != "action"}
    assert decode(enc(base), CFG).action == "click"
    assert decode(enc({**base, "action": None}), CFG).action == "click"     # null means "not given"
    assert decode(enc(base), CFG) == decode(enc({**base, "action": "click"}), CFG)


def test_extra_fields_are_ignored():
    extra = {**GOOD, "extra": [1, {"nested": [None, True, 1.5, "x"]}], "session": "s", "score": 0.5, "": {}}
    assert decode(enc(extra), CFG) == decode(enc(GOOD), CFG)


def test_limits_are_inclusive():
    assert decode(enc({**GOOD, "user_id": "u" * CFG.max_id_chars}), CFG).user_id == "u" * CFG.max_id_chars
    assert decode(enc({**GOOD, "ts": CFG.ts_min_ms}), CFG).ts == CFG.ts_min_ms
    assert decode(enc({**GOOD, "ts": CFG.ts_max_ms}), CFG).ts == CFG.ts_max_ms
    raw = enc(GOOD)
    exact = raw[:-1] + b" " * (CFG.max_payload_bytes - len(raw)) + b"}"
    assert len(exact) == CFG.max_payload_bytes and isinstance(decode(exact, CFG), Event)
    rejected(exact[:-1] + b" }", "oversized")


def test_ids_may_hold_any_printable_unicode():
    for uid in ("ユーザー", "émile", "a b", "😀", "x" * 127 + "é", "d-" + "0" * 24):
        assert decode(enc({**GOOD, "user_id": uid}), CFG).user_id == uid
        assert decode(enc({**GOOD, "user_id": uid}, ensure_ascii=False), CFG).user_id == uid


def test_derived_event_id_is_deterministic_and_content_addressed():
    base = {k: v for k, v in GOOD.items() if k not in ("event_id", "action")}
    e = decode(enc(base), CFG)
    assert isinstance(e, Event) and e.event_id == derive_event_id("u1", "i1", "video", "click", TS)
    # the same content, however it is spelled, gets the same id
    same = [
        enc(base),
        enc(dict(reversed(list(base.items())))),
        enc(base, separators=(",", ":")),
        enc(base, indent=2),
        enc({**base, "action": "click"}),
        enc({**base, "action": None}),
        enc({**base, "event_id": None}),
        enc({**base, "extra": {"x": [1, 2]}}),
    ]
    assert {decode(raw, CFG) for raw in same} == {e}
    # different content gets a different id
    different = [{**base, "user_id": "u2"}, {**base, "item_id": "i2"}, {**base, "scene": "shop"},
                 {**base, "action": "like"}, {**base, "ts": TS + 1}, {**base, "user_id": "u1i", "item_id": "1"}]
    ids = {decode(enc(obj), CFG).event_id for obj in different} | {e.event_id}
    assert len(ids) == len(different) + 1
    # an explicit id is kept as given
    assert decode(enc({**base, "event_id": "mine"}), CFG).event_id == "mine"


printable_id = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
                       | st.just(" "), min_size=1, max_size=CFG.max_id_chars).filter(
    lambda s: len(s.encode("utf-8", "surrogatepass")) <= CFG.max_id_bytes)
content_st = st.fixed_dictionaries({
    "user_id": printable_id, "item_id": printable_id, "scene": st.sampled_from(CFG.scenes),
    "ts": st.integers(CFG.ts_min_ms, CFG.ts_max_ms),
}, optional={"action": st.sampled_from(CFG.actions) | st.none(), "event_id": printable_id | st.none(),
             "extra": st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                                   | st.floats(allow_nan=False, allow_infinity=False),
                                   lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                       max_size=3), max_leaves=6)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content_st, st.booleans(), st.randoms(use_true_random=False))
def test_any_valid_payload_decodes_to_exactly_its_event(obj, ascii_only, rnd):
    items = list(obj.items())
    rnd.shuffle(items)
    raw = enc(dict(items), ensure_ascii=ascii_only)
    if len(raw) > CFG.max_payload_bytes:
        rejected(raw, "oversized")
        return
    got = decode(raw, CFG)
    action = obj.get("action") or "click"
    event_id = obj.get("event_id") or derive_event_id(obj["user_id"], obj["item_id"], obj["scene"], action,
                                                      obj["ts"])
    assert got == Event(event_id, obj["user_id"], obj["item_id"], obj["scene"], action, obj["ts"])
    assert decode(encode(got), CFG) == got


@settings(max_examples=300, deadline=None)
@given(content_st, content_st)
def test_derived_ids_are_equal_exactly_when_content_is_equal(a, b):
    a = {k: v for k, v in a.items() if k not in ("event_id", "extra")}
    b = {k: v for k, v in b.items() if k not in ("event_id", "extra")}
    ea, eb = decode(enc(a), CFG), decode(enc(b), CFG)
    assert isinstance(ea, Event) and isinstance(eb, Event)
    same_content = (ea.user_id, ea.item_id, ea.scene, ea.action, ea.ts) == (eb.user_id, eb.item_id, eb.scene,
                                                                             eb.action, eb.ts)
    assert (ea.event_id == eb.event_id) == same_content


# ----------------------------------------------------------------------------------------------------------------
# One concrete payload per rejection reason
# ----------------------------------------------------------------------------------------------------------------

REASON_EXAMPLES = {
    "oversized": [enc({**GOOD, "pad": "x" * CFG.max_payload_bytes}), b"{" + b" " * CFG.max_payload_bytes + b"}"],
    "not_utf8": [enc(GOOD).replace(b'"u1"', b'"u\xff1"'), b'{"user_id": "\xed\xa0\x80"}'],  # 2nd: a surrogate
    "bad_json": [enc(GOOD)[:-1], b"{'user_id': 'u1'}", b""],
    "non_finite": [enc({**GOOD, "ts": float("nan")}), enc({**GOOD, "extra": [float("-inf")]}),
                   enc(GOOD).replace(str(TS).encode(), b"1e999")],
    "not_object": [enc([GOOD]), b'"video"', b"null"],
    "missing_field": [enc({k: v for k, v in GOOD.items() if k != f}) for f in REQUIRED],
    "wrong_type": [enc({**GOOD, "ts": str(TS)}), enc({**GOOD, "ts": float(TS)}), enc({**GOOD, "ts": True}),
                   enc({**GOOD, "user_id": 17}), enc({**GOOD, "scene": ["video"]}), enc({**GOOD, "action": 1}),
                   enc({**GOOD, "event_id": {"id": "e1"}})],
    "empty_field": [enc({**GOOD, f: ""}) for f in ID_FIELDS],
    "too_long": [enc({**GOOD, f: "i" * (CFG.max_id_chars + 1)}) for f in ID_FIELDS] +
                [enc({**GOOD, f: "😀" * (CFG.max_id_bytes // 4 + 1)}) for f in ID_FIELDS],   # few chars, many bytes
    "bad_chars": [enc({**GOOD, "user_id": "u\x001"}), enc({**GOOD, "item_id": "i\u2028"}),
                  enc({**GOOD, "event_id": "e\ud800"}), enc({**GOOD, "user_id": "u\t1"})],
    "unknown_scene": [enc({**GOOD, "scene": "podcast"}), enc({**GOOD, "scene": "Video"}), enc({**GOOD, "scene": ""})],
    "unknown_action": [enc({**GOOD, "action": "share"}), enc({**GOOD, "action": "CLICK"})],
    "ts_out_of_range": [enc({**GOOD, "ts": TS // 1000}),   # seconds, not milliseconds
                        enc({**GOOD, "ts": -1}), enc({**GOOD, "ts": CFG.ts_max_ms + 1})],
}


def test_every_reason_has_an_example():
    assert set(REASON_EXAMPLES) == PAYLOAD_REASONS


@pytest.mark.parametrize("reason", sorted(REASON_EXAMPLES))
def test_each_reason(reason):
    for raw in REASON_EXAMPLES[reason]:
        rejected(raw, reason)
        assert oracle(raw) is None


def test_non_bytes_input_is_rejected_not_raised():
    for raw in (None, "text", 42, [b"x"], {"a": 1}):
        assert decode(raw, CFG).reason == "wrong_type"


def test_deep_nesting_hits_the_parser_limit_as_bad_json():
    rejected(b"[" * 100_000, "oversized")
    rejected(b"[" * 100_000, "bad_json", BIG)
    rejected(b'{"a":' * 50_000, "bad_json", BIG)
    rejected(b"[" * 50_000 + b"]" * 50_000, "bad_json", BIG)
    rejected(enc(GOOD)[:-1] + b',"x":' + b"[" * 1200 + b"]" * 1200 + b"}", "bad_json")


# ----------------------------------------------------------------------------------------------------------------
# Seeded fuzz: at least 10,000 malformed payloads
# ----------------------------------------------------------------------------------------------------------------

_ID_CHARS = string.ascii_letters + string.digits + "-_:.@/ " + "éßñ中文ユ😀"
_BAD_ID_CHARS = ([chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]
                 + ["\u00a0", "\u00ad", "\u200b", "\u200e", "\u2028", "\u2029", "\u3000", "\ufeff",  # Zs/Cf/Zl/Zp
                    "\ud800", "\udfff", "\ue000", "\U000f0000", "\u0378", "\uffff"])              # Cs/Co/Cn
_WRONG_VALUES = [True, False, 0, 1, -7, 1.5, -0.0, 1e300, 10**30, -(10**30), 2**64, [], ["u1"], {}, {"id": "u1"},
                 [[[[[1]]]]], {"a": {"b": {"c": [None]}}}, [None], ""]


def _rid(rng, lo=1, hi=24) -> str:
    return "".join(rng.choice(_ID_CHARS) for _ in range(rng.randint(lo, hi)))


def _valid_obj(rng) -> dict:
    obj = {"user_id": _rid(rng), "item_id": _rid(rng), "scene": rng.choice(CFG.scenes),
           "ts": rng.randint(CFG.ts_min_ms, CFG.ts_max_ms)}
    r = rng.random()
    if r < 0.6:
        obj["action"] = rng.choice(CFG.actions)
    elif r < 0.7:
        obj["action"] = None
    r = rng.random()
    if r < 0.6:
        obj["event_id"] = _rid(rng)
    elif r < 0.7:
        obj["event_id"] = None
    if rng.random() < 0.3:
        obj["extra"] = rng.choice([12345, "note", [1, 2.5, None], {"k": {"v": True}}])
    return obj


def _dump(obj, rng, ascii_only=None) -> bytes:
    items = list(obj.items())
    rng.shuffle(items)
    ascii_only = rng.random() < 0.5 if ascii_only is None else ascii_only
    seps = rng.choice([(",", ":"), (", ", ": ")])
    return json.dumps(dict(items), ensure_ascii=ascii_only, separators=seps).encode("utf-8", "surrogatepass")


def _valid_raw(rng) -> bytes:
    return _dump(_valid_obj(rng), rng)


def _m_wrong_type(rng):
    obj, field = _valid_obj(rng), rng.choice(("user_id", "item_id", "scene", "action", "ts", "event_id"))
    if field == "ts":
        value = rng.choice([None, True, False, 1.5, float(TS), 1.7e12, str(TS), "", [], [TS], {}, {"ms": TS}])
    else:
        value = rng.choice(_WRONG_VALUES[:-1] + ([] if field in ("action", "event_id") else [None]))
    obj[field] = value
    return _dump(obj, rng), "wrong_type"


def _m_missing(rng):
    obj = _valid_obj(rng)
    for f in rng.sample(REQUIRED, rng.randint(1, len(REQUIRED))):
        del obj[f]
    return _dump(obj, rng), "missing_field"


def _m_empty(rng):
    obj = _valid_obj(rng)
    obj[rng.choice(ID_FIELDS)] = ""
    return _dump(obj, rng), "empty_field"


def _m_too_long(rng):
    obj = _valid_obj(rng)
    obj[rng.choice(ID_FIELDS)] = _rid(rng, CFG.max_id_chars + 1, rng.choice([140, 400, 1500]))
    raw = _dump(obj, rng)
    return raw, "oversized" if len(raw) > CFG.max_payload_bytes else "too_long"


def _m_bad_chars(rng):
    obj, field = _valid_obj(rng), rng.choice(ID_FIELDS)
    value = obj.get(field) or _rid(rng)
    at = rng.randint(0, len(value))
    obj[field] = value[:at] + "".join(rng.choice(_BAD_ID_CHARS) for _ in range(rng.randint(1, 3))) + value[at:]
    obj[field] = obj[field][:CFG.max_id_chars]
    if all(c == " " or unicodedata.category(c) not in _NONPRINTABLE for c in obj[field]):
        obj[field] = "\x00"
    surrogate = any(unicodedata.category(c) == "Cs" for c in obj[field])
    return _dump(obj, rng, ascii_only=True if surrogate else None), "bad_chars"


def _m_unknown_scene(rng):
    obj = _valid_obj(rng)
    s = rng.choice(CFG.scenes)
    obj["scene"] = rng.choice(["", " ", s.upper(), s.title(), " " + s, s + " ", s[:-1], s + "s", s + "\x00",
                               "podcast", "ｖｉｄｅｏ", "*", "null", _rid(rng)])
    if obj["scene"] in CFG.scenes:
        obj["scene"] = "podcast"
    return _dump(obj, rng), "unknown_scene"


def _m_unknown_action(rng):
    obj = _valid_obj(rng)
    a = rng.choice(CFG.actions)
    obj["action"] = rng.choice(["", " ", a.upper(), a + "s", a[1:], "share", "purchase", "null", _rid(rng)])
    if obj["action"] in CFG.actions:
        obj["action"] = "share"
    return _dump(obj, rng), "unknown_action"


def _m_non_finite(rng):
    obj = _valid_obj(rng)
    bad = rng.choice([float("nan"), float("inf"), float("-inf")])
    where = rng.choice(("user_id", "item_id", "scene", "action", "ts", "event_id", "extra", "nested"))
    obj[where if where != "nested" else "extra"] = bad if where != "nested" else {"a": [1, {"b": bad}]}
    raw = _dump(obj, rng)
    if where == "ts" and rng.random() < 0.3:   # an overflowing number is parsed as inf without a literal
        raw = raw.replace(b"Infinity", b"1e999").replace(b"NaN", b"-1e999")
    return raw, "non_finite"


def _m_ts_range(rng):
    obj = _valid_obj(rng)
    ts = obj["ts"]
    obj["ts"] = rng.choice([-1, 0, 1, -TS, ts // 1000, ts * 1000, CFG.ts_min_ms - 1, CFG.ts_max_ms + 1,
                            CFG.ts_min_ms - rng.randint(1, 10**12), CFG.ts_max_ms + rng.randint(1, 10**15),
                            2**63, -(2**63), 10**30, -(10**40), 10**300])
    return _dump(obj, rng), "ts_out_of_range"


_BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80",
             b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xc3", b"\xe4\xb8", b"\xf0\x9f\x98"]


def _m_not_utf8(rng):
    kind = rng.randrange(3)
    if kind == 0:
        raw = bytearray(_valid_raw(rng))
        at = rng.randint(0, len(raw))
        raw[at:at] = rng.choice(_BAD_UTF8)
        raw = bytes(raw)
    elif kind == 1:
        obj = _valid_obj(rng)
        obj["user_id"] = "é" + obj["user_id"][:100]
        raw = json.dumps(obj, ensure_ascii=False).encode(rng.choice(["latin-1", "utf-16", "utf-16-le",
                                                                     "utf-32", "cp1252"]), "replace")
    else:
        raw = _valid_raw(rng) + rng.choice(_BAD_UTF8[-3:])   # truncated multi-byte character at the end
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw, "not_utf8"
    return None


def _m_bad_json(rng):
    good = _valid_raw(rng)
    kind = rng.randrange(5)
    if kind == 0:
        raw = good[:rng.randrange(len(good))]                 # truncated
    elif kind == 1:
        raw = good + rng.choice([b"x", b",", b"}", b"]", b" {}", good, b"\x00"])   # trailing garbage
    elif kind == 2:
        raw = rng.choice([b"", b" ", b"\n\t", b"{", b"}", b"[", b"{'user_id': 'u'}", b'{"a" 1}', b"{a: 1}",
                          b'{"a": 1,}', b"[1,]", b"True", b"None", b"nan", b"inf", b"0x10", b"017", b"+1", b".5",
                          b'{"a": "\\x41"}', b'{"a": "\\u12"}', b"/* c */ {}", b'{"a": "tab\there"}',
                          b"\xef\xbb\xbf" + good, b'"unterminated', b"[1 2]", b"{} {}"])
    elif kind == 3:                                          # a required value replaced by a non-JSON token
        obj = _valid_obj(rng)
        obj[rng.choice(REQUIRED)] = "@@TOKEN@@"
        raw = _dump(obj, rng).replace(b'"@@TOKEN@@"', rng.choice([b"undefined", b"'x'", b"None", b"01", b"1.",
                                                                 b"--1", b"", b"{", b"x"]))
    else:                                                    # nesting deeper than the parser allows
        depth = rng.randint(1100, 1900)
        raw = good[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw, "not_utf8"                               # a truncation inside a multi-byte character
    return raw, "oversized" if len(raw) > CFG.max_payload_bytes else "bad_json"


def _m_not_object(rng):
    good = _valid_obj(rng)
    value = rng.choice([[], [good], [[good]], 0, 42, -1.5, 1e300, 10**30, "video", "", True, False, None,
                        [None] * 5, ["user_id", "u1"]])
    if rng.random() < 0.2:
        depth = rng.randint(2, 400)
        return b"[" * depth + b"]" * depth, "not_object"
    return json.dumps(value, ensure_ascii=False).encode(), "not_object"


def _m_deep(rng):
    open_, close = rng.choice([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")])
    n = rng.choice([rng.randint(1100, 4000), 100_000])
    raw = open_ * n + (close * n if rng.random() < 0.5 else b"")
    return raw, "oversized" if len(raw) > CFG.max_payload_bytes else "bad_json"


def _m_oversized(rng):
    kind = rng.randrange(3)
    if kind == 0:
        obj = _valid_obj(rng)
        obj["pad"] = "x" * rng.randint(CFG.max_payload_bytes, 3 * CFG.max_payload_bytes)
        raw = _dump(obj, rng)
    elif kind == 1:
        good = _valid_raw(rng)
        raw = good[:-1] + b" " * (CFG.max_payload_bytes - len(good) + 1 + rng.randrange(50)) + b"}"
    else:
        raw = bytes(rng.randrange(256) for _ in range(CFG.max_payload_bytes + 1 + rng.randrange(100)))
    return raw, "oversized"


def _m_random_bytes(rng):
    raw = bytearray(_valid_raw(rng))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        at = rng.randrange(len(raw) + 1) if raw else 0
        if op == 0 and raw:                                     # flip bits of a byte
            at = min(at, len(raw) - 1)
            raw[at] ^= 1 << rng.randrange(8)
        elif op == 1 and raw:                                   # replace a byte
            raw[min(at, len(raw) - 1)] = rng.randrange(256)
        elif op == 2:                                           # insert bytes (printable, structural or binary)
            raw[at:at] = bytes(rng.choice([rng.randrange(256), rng.choice(b'{}[]":,\\ 0e-.'),
                                           rng.randrange(32)]) for _ in range(rng.randint(1, 3)))
        elif op == 3:                                           # delete a span
            del raw[at:at + rng.randint(1, 4)]
        else:                                                   # truncate
            del raw[at:]
    return bytes(raw), None                                     # any reason; validity judged by the oracle


MUTATIONS = {
    "wrong_type": (_m_wrong_type, 8), "missing_field": (_m_missing, 4), "empty_field": (_m_empty, 3),
    "too_long": (_m_too_long, 3), "bad_chars": (_m_bad_chars, 6), "unknown_scene": (_m_unknown_scene, 3),
    "unknown_action": (_m_unknown_action, 3), "non_finite": (_m_non_finite, 4), "ts_out_of_range": (_m_ts_range, 4),
    "not_utf8": (_m_not_utf8, 4), "bad_json": (_m_bad_json, 6), "not_object": (_m_not_object, 3),
    "deep_nesting": (_m_deep, 1), "oversized": (_m_oversized, 2), "random_bytes": (_m_random_bytes, 20),
}


def test_ten_thousand_malformed_payloads_are_each_rejected_with_a_reason():
    rng = random.Random(20240611)
    names = list(MUTATIONS)
    weights = [MUTATIONS[n][1] for n in names]
    counted, per_kind, reasons = 0, Counter(), Counter()
    while counted < 12_000:
        kind = rng.choices(names, weights)[0]
        made = MUTATIONS[kind][0](rng)
        if made is None:
            continue
        raw, expected = made
        want = oracle(raw)
        got = decode(raw, CFG)
        if want is not None:
            # only a random byte mutation may land on a payload that is still valid: it must then decode exactly
            assert kind == "random_bytes", (kind, raw[:200])
            assert got == want, (raw[:200], got, want)
            continue
        assert isinstance(got, Rejection), (kind, raw[:200], got)
        assert got.reason in REASONS and got.reason != "decoder_error", (kind, raw[:200], got)
        assert isinstance(got.detail, str) and got.detail.strip(), (kind, raw[:200], got)
        if expected is not None:
            assert got.reason == expected, (kind, raw[:200], got)
        counted += 1
        per_kind[kind] += 1
        reasons[got.reason] += 1
    assert counted >= 10_000
    assert all(per_kind[k] >= 100 for k in MUTATIONS), per_kind
    assert set(reasons) == PAYLOAD_REASONS, reasons


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_decode_without_raising(raw):
    got = decode(raw, CFG)
    assert isinstance(got, (Event, Rejection))
    if isinstance(got, Rejection):
        assert got.reason in REASONS and got.reason != "decoder_error" and got.detail
    if isinstance(got, Event):
        assert got == oracle(raw)
    else:
        assert oracle(raw) is None


_any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                         max_leaves=8)
_field_value = {
    "user_id": printable_id | st.just("") | st.text(max_size=5) | _any_json,
    "item_id": printable_id | st.just("") | st.text(min_size=120, max_size=140) | _any_json,
    "scene": st.sampled_from(CFG.scenes) | st.text(max_size=8) | _any_json,
    "action": st.sampled_from(CFG.actions) | st.text(max_size=8) | _any_json,
    "ts": st.integers(CFG.ts_min_ms - 10, CFG.ts_min_ms + 10) | st.integers(CFG.ts_max_ms - 10, CFG.ts_max_ms + 10)
    | st.integers() | _any_json,
    "event_id": printable_id | st.just("") | _any_json,
}


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_field_value), st.booleans())
def test_near_valid_json_objects_decode_as_the_oracle_says(obj, ascii_only):
    raw = enc(obj, ensure_ascii=ascii_only)
    got, want = decode(raw, CFG), oracle(raw)
    if want is None:
        assert isinstance(got, Rejection) and got.reason in REASONS and got.reason != "decoder_error", (obj, got)
        assert got.detail
    else:
        assert got == want


_ascii_id = st.text(st.characters(max_codepoint=127), max_size=CFG.max_id_chars + 2) | st.sampled_from(
    ["", " ", "\x00", "a\x7f", "a\tb", "a" * CFG.max_id_chars, "a" * (CFG.max_id_chars + 1)])
_near_field = {**_field_value, "user_id": _ascii_id | _field_value["user_id"],
               "item_id": _ascii_id | _field_value["item_id"],
               "event_id": _ascii_id | st.none() | _field_value["event_id"],
               "action": _field_value["action"] | st.none()}
_MISSING = object()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([None, CFG.ts_min_ms, TS, CFG.ts_max_ms]))
def test_the_fast_path_says_only_what_the_full_rules_say(data, not_after):
    """validate_record answers the common payload in a few checks (`_accept`); whatever it accepts, the full rules
    must accept as the same event, and it must not refuse on its own (None hands over to them). Payloads: a valid
    one with up to two fields changed or dropped, so that each of the fast path's checks is the one that matters."""
    obj = dict(GOOD)
    for field in data.draw(st.lists(st.sampled_from(sorted(_near_field)), max_size=2, unique=True)):
        value = data.draw(_near_field[field] | st.just(_MISSING))
        if value is _MISSING:
            del obj[field]
        else:
            obj[field] = value
    fast = _accept(obj, CFG, not_after)
    assert fast is None or fast == _judge(obj, CFG, not_after), (obj, fast)


def test_the_fast_path_takes_the_common_payload():
    """Else it would be dead code that the test above cannot tell from a fast one."""
    assert _accept(dict(GOOD), CFG, None) == _judge(dict(GOOD), CFG, None)
    assert _accept({k: v for k, v in GOOD.items() if k not in ("action", "event_id")}, CFG, TS) is not None
