"""The published record of a user's interests (docs/operations.md, "Output record"), cut from the vector arrays of a
micro-batch (core/slot_step.py: SlotVectors, or core/vector_table.py's rows, which have the same fields): as a dict,
in the compact binary form (the default on the output topic), or as JSON (`--output-format json`).

JSON writes every float32 as the shortest decimal that reads back to it: ~576 numbers per record with three
scenes at d=64, ~12 µs of formatting per record however it is built, most of what publishing costs a fresh event
(BENCHMARKS.md, "Output format"). The binary form is the same fields as little-endian arrays, ~1 µs.

Binary record, version 1 (all integers little-endian; S scenes, d the vector width):

    4 bytes   magic b"SSI\\x01"
    u8        S, then S times: u8 length + the scene's name (UTF-8)
    u16       d
    u8        length + model_version (ASCII)
    u16       length + user_id (UTF-8)
    i64       newest_ts
    i32       events
    u8[S]     has: 1 where the scene has history (`scenes` holds only those)
    f32[S,d]  h_s per scene (zeros where has is 0)
    f32[S+1,d]  fused: H_j per scene, then the global vector
    f32[d]    recent
    f32[S+1,S]  weights[target][source] (targets: the scenes, then global)

`decode_binary` reads it back into the JSON record's dict (vectors as float32 arrays); `read_record` reads either
form.
"""
from __future__ import annotations

import struct
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import orjson

from .window import UserState

FORMATS = ("json", "binary")
MAGIC = b"SSI\x01"


class Vectors(Protocol):
    """Row-aligned arrays of users' vectors (S scenes, width d)."""
    h: np.ndarray          # [U, S, d]
    has: np.ndarray        # [U, S] bool
    recent: np.ndarray     # [U, d]
    fused: np.ndarray      # [U, S + 1, d]
    weights: np.ndarray    # [U, S + 1, S]
    newest_ts: np.ndarray  # [U]
    events: np.ndarray     # [U]


def record(user: str, vec: Vectors, row: int, scenes: Sequence[str], version: str, copy: bool = True) -> dict:
    """Row `row` as the record's dict. Vectors stay float32 arrays (`record_json` writes them without a Python float
    per element); with `copy` they are the record's own, else views of `vec` (for a record serialized at once)."""
    has = vec.has[row]
    present = [i for i in range(len(scenes)) if has[i]]
    targets = list(scenes) + ["global"]
    weights = vec.weights[row].tolist()
    h, fused, recent = vec.h[row], vec.fused[row], vec.recent[row]
    if copy:
        h, fused, recent = h.copy(), fused.copy(), recent.copy()
    return {
        "user_id": user,
        "model_version": version,
        "scenes": {scenes[i]: h[i] for i in present},
        "fused": {s: fused[j] for j, s in enumerate(scenes)},
        "global": fused[len(scenes)],
        "recent": recent,
        "weights": {t: {scenes[i]: weights[j][i] for i in present} for j, t in enumerate(targets)},
        "newest_ts": int(vec.newest_ts[row]),
        "events": int(vec.events[row]),
    }


def record_json(rec: dict) -> bytes:
    """A record as JSON bytes: float32 vectors as lists of the shortest decimals that read back to the same
    float32 values."""
    return orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY)


def records_json(users: Sequence[str], vec: Vectors, scenes: Sequence[str], version: str) -> list[bytes]:
    """The JSON record of every row (users[r] is row r's user)."""
    return [record_json(record(user, vec, r, scenes, version, copy=False)) for r, user in enumerate(users)]


def records_binary(users: Sequence[str], vec: Vectors, scenes: Sequence[str], version: str) -> list[bytes]:
    """The binary record (module docstring) of every row: the fixed-size part of all rows as one array."""
    U, S = len(users), len(scenes)
    if not U:
        return []
    d = vec.recent.shape[1]
    head = MAGIC + bytes([S]) + b"".join(bytes([len(s.encode())]) + s.encode() for s in scenes) + \
        struct.pack("<H", d) + bytes([len(version)]) + version.encode("ascii")
    fixed = np.zeros(U, _fixed_dtype(S, d))
    fixed["newest_ts"], fixed["events"], fixed["has"] = vec.newest_ts, vec.events, vec.has
    fixed["h"], fixed["fused"], fixed["recent"], fixed["weights"] = vec.h, vec.fused, vec.recent, vec.weights
    raw, size = memoryview(fixed.view(np.uint8).reshape(-1)), fixed.dtype.itemsize   # rows joined, not copied first
    pack, out = struct.Struct("<H").pack, []
    for r, user in enumerate(users):
        name = user.encode("utf-8", "surrogatepass")
        out.append(b"".join((head, pack(len(name)), name, raw[r * size:(r + 1) * size])))
    return out


def decode_binary(raw: bytes) -> dict:
    """A binary record as the JSON record's dict (vectors as float32 arrays); ValueError if it is not one."""
    if raw[:4] != MAGIC:
        raise ValueError("not a SceneStream binary record (version 1)")
    S, at = raw[4], 5
    scenes = []
    for _ in range(S):
        n = raw[at]
        scenes.append(raw[at + 1:at + 1 + n].decode())
        at += 1 + n
    (d,) = struct.unpack_from("<H", raw, at)
    n = raw[at + 2]
    version = raw[at + 3:at + 3 + n].decode("ascii")
    at += 3 + n
    (n,) = struct.unpack_from("<H", raw, at)
    user = raw[at + 2:at + 2 + n].decode("utf-8", "surrogatepass")
    at += 2 + n
    dtype = _fixed_dtype(S, d)
    if len(raw) - at != dtype.itemsize:
        raise ValueError(f"binary record of {len(raw)} bytes: {at + dtype.itemsize} expected")
    fixed = np.frombuffer(raw, dtype, 1, at)
    return record(user, _Row(fixed), 0, scenes, version)


def read_record(value: bytes) -> dict:
    """An output topic value of either form as the record's dict (JSON's vectors as lists, binary's as arrays)."""
    return decode_binary(value) if value[:4] == MAGIC else orjson.loads(value)


def _fixed_dtype(S: int, d: int) -> np.dtype:
    return np.dtype([("newest_ts", "<i8"), ("events", "<i4"), ("has", "u1", (S,)), ("h", "<f4", (S, d)),
                     ("fused", "<f4", (S + 1, d)), ("recent", "<f4", (d,)), ("weights", "<f4", (S + 1, S))])


class _Row:
    """One decoded fixed part, read as `Vectors`."""

    def __init__(self, fixed: np.ndarray):
        for name in fixed.dtype.names:
            setattr(self, name, fixed[name])
        self.has = self.has.astype(bool)


def encode_records(fmt: str, users: Sequence[str], vec: Vectors, scenes: Sequence[str], version: str) -> list[bytes]:
    """The output topic's values for every row, in format `fmt` (FORMATS)."""
    return (records_binary if fmt == "binary" else records_json)(users, vec, scenes, version)


class Encoder(Protocol):
    """What `interest_records` needs of the model (scenestream.model.infer.InterestEncoder): passed in, so this
    layer never loads torch."""
    scenes: tuple[str, ...]
    version: str

    def interests(self, states: Mapping[str, UserState]) -> Any: ...


def interest_records(encoder: Encoder, states: Mapping[str, UserState]) -> list[dict]:
    """Records of users' windows encoded whole (no cache): what a request reads for a user whose newest vectors are
    of another model, and what the exactness tests hold the streaming step to."""
    vec = encoder.interests(states)
    vec.newest_ts = np.array([max(w.last_ts for w in states[u].values() if w) for u in vec.users], np.int64)
    vec.events = np.array([sum(len(w) for w in states[u].values()) for u in vec.users], np.int64)
    return [record(u, vec, r, encoder.scenes, encoder.version) for r, u in enumerate(vec.users)]
