"""Seeded hostile payloads for the fuzz test (tests/test_fuzz.py) and its full run (bench/fuzz.py): structured
mutations of valid clickstream events and catalog records, named by kind.

Each payload starts from a valid value and gets one mutation: a field of the wrong type, a huge number, a unicode
edge case, a missing field, nested junk, a NaN/Infinity literal, a wrong top-level value, an oversized payload,
truncation, flipped/inserted/deleted bytes, or random bytes; a few stay valid. Catalog records also get vector
mutations (wrong length, non-finite or out-of-float32 numbers, junk elements, a huge vector).
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from typing import Callable, Iterator

from scenestream.stream.core.config import StreamConfig

CFG = StreamConfig()
TS = 1_767_225_600_000
UNICODE = ["\u0000", "\u001f", "\u007f", "\u200b", "\u200e", "\u202e", "\ufeff", "\ufffe", "\uffff", "\ud800",
           "\udfff", "\ue000", "\U0010ffff", "\u0378", "e\u0301", "😀", "👩‍👩‍👧", "ß", "İ", "Å", "\u2028", " ", "\t",
           "\\", '"', "/", "\n"]
NUMBERS = [0, -1, 1.5, -0.0, 2**31, 2**53 + 1, 2**63, -2**63 - 1, 2**64, 10**30, -10**300, 1e308, -1e308, 5e-324,
           3.4028235e38, 3.5e38, TS + 0.5, float(TS)]
LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 400, "1" + "0" * 5000, "0x10", "01",
            "1.", ".5", "+1", "true", "null", '"\\ud800"', '"\\u0000"', "[]", "{}"]


def junk(rng: random.Random, depth: int = 0):
    """A random JSON value, nested up to a few levels."""
    roll = rng.random()
    if depth < 4 and roll < 0.15:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 4 and roll < 0.3:
        return {uni(rng, 6): junk(rng, depth + 1) for _ in range(rng.randrange(4))}
    return rng.choice([None, True, False, rng.choice(NUMBERS), uni(rng, 12), rng.random(), rng.randrange(-9, 10)])


def uni(rng: random.Random, n: int) -> str:
    """A short string of printable ASCII and unicode edge cases."""
    return "".join(rng.choice(UNICODE) if rng.random() < 0.3 else chr(rng.randrange(32, 127))
                   for _ in range(rng.randrange(n + 1)))


def valid_event(rng: random.Random) -> dict:
    e = {"user_id": f"u{rng.randrange(10**6)}", "item_id": f"i{rng.randrange(10**6)}",
         "scene": rng.choice(CFG.scenes), "action": rng.choice(CFG.actions), "ts": TS + rng.randrange(10**9)}
    if rng.random() < 0.5:
        e["event_id"] = f"e{rng.getrandbits(64):x}"
    return e


def valid_record(rng: random.Random, dim: int) -> dict:
    r = {"item_id": f"i{rng.randrange(10**6)}", "scene": rng.choice(CFG.scenes)}
    roll = rng.random()
    if roll < 0.6:
        r["vector"] = [rng.uniform(-3, 3) for _ in range(dim)]
    elif roll < 0.8:
        r["op"] = "delete"
    return r


def dump(obj, rng: random.Random) -> bytes:
    """JSON bytes, sometimes with raw (invalid UTF-8) surrogates or odd whitespace."""
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 0, 2]))
    return text.encode("utf-8", "surrogatepass")


def mutate_fields(obj: dict, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of a valid JSON object: (kind, payload)."""
    obj, key = dict(obj), rng.choice(sorted(obj))
    kind = rng.choice(FIELD_MUTATIONS)
    if kind == "wrong_type":
        obj[key] = junk(rng)
    elif kind == "huge_number":
        obj[key] = rng.choice(NUMBERS + [10 ** rng.randrange(20, 1000), -(2 ** rng.randrange(64, 2000))])
    elif kind == "unicode":
        obj[key] = uni(rng, 40) if rng.random() < 0.7 else rng.choice(UNICODE) * rng.randrange(1, 300)
    elif kind == "missing_field":
        for k in rng.sample(sorted(obj), rng.randrange(1, len(obj) + 1)):
            del obj[k]
    elif kind == "nested_junk":
        obj[rng.choice([key, uni(rng, 8)])] = [junk(rng) for _ in range(rng.randrange(1, 6))]
    elif kind == "literal":   # a token json.dumps never writes, spliced in as the field's value
        marker = "\x00MARK\x00"
        obj[key] = marker
        return kind, dump(obj, rng).replace(json.dumps(marker).encode(), rng.choice(LITERALS).encode())
    elif kind == "top_level":
        return kind, dump(rng.choice([[obj], list(obj.values()), obj.get(key), junk(rng), "x" * 50]), rng)
    elif kind == "oversized":
        obj[uni(rng, 4) or "pad"] = "x" * rng.randrange(4000, 70_000)
    elif kind == "duplicate_key":
        raw = dump(obj, rng)
        return kind, raw[:-1] + b', "' + key.encode() + b'": ' + json.dumps(junk(rng)).encode() + b"}"
    return kind, dump(obj, rng)


def mutate_bytes(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(BYTE_MUTATIONS)
    if kind == "truncation":
        return kind, raw[:rng.randrange(len(raw))]
    b = bytearray(raw)
    if kind == "bit_flips":
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "byte_splice":
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(len(b) + 1)
            b[at:at + rng.randrange(3)] = rng.randbytes(rng.randrange(4))
    else:   # random_bytes
        b = bytearray(rng.randbytes(rng.choice([0, 1, 2, 8, 64, 600, 5000])))
    return kind, bytes(b)


FIELD_MUTATIONS = ("wrong_type", "huge_number", "unicode", "missing_field", "nested_junk", "literal", "top_level",
                   "oversized", "duplicate_key")
BYTE_MUTATIONS = ("truncation", "bit_flips", "byte_splice", "random_bytes")


def mutate_vector(obj: dict, rng: random.Random, dim: int) -> tuple[str, bytes]:
    obj = {**obj, "vector": [rng.uniform(-3, 3) for _ in range(dim)]}
    v, kind = obj["vector"], rng.choice(("wrong_dim", "non_finite", "junk_element", "huge_vector"))
    if kind == "wrong_dim":
        obj["vector"] = v[:rng.randrange(dim)] if rng.random() < 0.5 else v + [0.0] * rng.randrange(1, 50)
    elif kind == "non_finite":
        v[rng.randrange(dim)] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e39, -3.5e38, 10**400])
    elif kind == "junk_element":
        v[rng.randrange(dim)] = junk(rng)
    else:
        obj["vector"] = [rng.random() for _ in range(rng.choice([10_000, 100_000]))]
    return f"vector_{kind}", dump(obj, rng)


def payloads(make: Callable[[random.Random], dict], n: int, seed: int,
             extra: Callable[[dict, random.Random], tuple[str, bytes]] | None = None) -> Iterator[tuple[str, bytes]]:
    """n (kind, payload) pairs: 5% valid, 10% vector mutations when `extra` is given, the rest field and byte
    mutations of a fresh valid value."""
    rng = random.Random(seed)
    for _ in range(n):
        obj, roll = make(rng), rng.random()
        if roll < 0.05:
            yield "valid", dump(obj, rng)
        elif extra is not None and roll < 0.15:
            yield extra(obj, rng)
        elif roll < 0.65:
            yield mutate_fields(obj, rng)
        else:
            yield mutate_bytes(dump(obj, rng), rng)


def event_payloads(n: int, seed: int = 16) -> Iterator[tuple[str, bytes]]:
    return payloads(valid_event, n, seed)


def catalog_payloads(n: int, dim: int, seed: int = 16) -> Iterator[tuple[str, bytes]]:
    return payloads(lambda rng: valid_record(rng, dim), n, seed, lambda obj, rng: mutate_vector(obj, rng, dim))


def fuzz(decode_one: Callable[[bytes], object], items) -> dict:
    """Feed every (kind, payload) to `decode_one`; a summary of outcomes (an accepted value, or a rejection reason),
    escaped exceptions (must be 0), and valid payloads refused (must be 0). decode_seconds counts decoding only."""
    kinds, outcomes, escaped, refused, spent = Counter(), Counter(), [], [], 0.0
    for kind, raw in items:
        kinds[kind] += 1
        t0 = time.perf_counter()
        try:
            got = decode_one(raw)
        except Exception as exc:   # noqa: BLE001 - what the fuzz looks for
            escaped.append(f"{kind} {raw[:80]!r}: {type(exc).__name__}: {exc}"[:300])
            continue
        finally:
            spent += time.perf_counter() - t0
        reason = getattr(got, "reason", None)
        outcomes[reason or "accepted"] += 1
        if kind == "valid" and reason:
            refused.append(f"{raw[:80]!r}: {got}"[:300])
    return {"payloads": sum(kinds.values()), "decode_seconds": round(spent, 3), "exceptions": len(escaped),
            "decoder_errors": outcomes["decoder_error"], "valid_refused": len(refused),
            "outcomes": dict(outcomes.most_common()), "by_kind": dict(sorted(kinds.items())),
            "examples": escaped[:5] + refused[:5]}
