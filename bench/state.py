"""State size: bytes per (user, scene) window in RAM and in the changelog, and the RSS of a
process holding N users in state.

Every user gets `--scenes` scenes of exactly `--events-per-window` events (full windows), with the id shapes of
`stream/datasets/synthetic.py`: user `u000123`, event `e000123-00042` (unique per event), item `v0-00123` (300 per scene),
actions drawn view/click/like/buy at 55/30/10/5 %. Events reach the state the way the worker's do: each payload is
the canonical JSON of its event, read back with `decode` (so every string and every ts int is private to its Event,
as orjson makes them), then joined with `apply_user`. The RAM figure is also given for state recovered from the
changelog (`decode_state`: the user id is shared by all the user's events, the scene by its window).

1. RAM per window: tracemalloc over a sample (`--sample-users`, every scene), the bytes still allocated once the
   sample's state is built, divided by the windows; plus a breakdown by object (sys.getsizeof, each distinct object
   once), with how many distinct objects each field has, i.e. what is shared.
2. Changelog per window: len(encode_state({scene: window})) + len(state_key(user, scene)), mean over the sample.
3. RSS: a child process builds N users in chunks and reads VmRSS (/proc/self/status) before and after. When N users
   would not fit in `--max-rss-gb` (default 70 % of MemAvailable), it builds as many as fit and extrapolates
   linearly to N (`extrapolated_from_users`).

Each form of the state is one entry of FORMS (name -> function building one user's state from their events):
`packed`, the worker's (stream/core/window.py: one bytes object of 24-byte rows and the ids per window), and
`object`, the form before it (a tuple of Event objects per window, the newest L of each scene's events), kept here
to measure both side by side in one run.

    python bench/state.py [--users 1000000] [--events-per-window 50] [--scenes 3] [--max-rss-gb G] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import random
import shlex
import sys
import time
import tracemalloc
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable

from tqdm import tqdm

from scenestream.stream.core.config import DEFAULT_ACTIONS, DEFAULT_SCENES, StreamConfig
from scenestream.stream.core.events import Event, decode, encode
from scenestream.stream.core.window import Window, apply_user
from scenestream.stream.live.changelog import decode_state, encode_state, state_key
from scenestream.stream.datasets.synthetic import BASE_TS_MS

ITEMS_PER_SCENE = 300                       # SyntheticSpec.items_per_scene
ACTION_CUM = [0.55, 0.85, 0.95, 1.0]        # synthetic.py's action mix


def _scenes(n: int) -> tuple[str, ...]:
    return tuple(DEFAULT_SCENES[:n]) if n <= len(DEFAULT_SCENES) else \
        (*DEFAULT_SCENES, *(f"scene{i}" for i in range(len(DEFAULT_SCENES), n)))


def user_payloads(u: int, scenes: tuple[str, ...], length: int, rng: random.Random) -> list[bytes]:
    """The JSON payloads of one user's events: `length` per scene, in time order, synthetic.py's id shapes."""
    user = f"u{u:06d}"
    ts = BASE_TS_MS + rng.randrange(86_400_000)
    out = []
    for k in range(length * len(scenes)):
        s = k % len(scenes)
        scene = scenes[s]
        item = f"{scene[0]}{s}-{rng.randrange(ITEMS_PER_SCENE):05d}"
        action = rng.choices(DEFAULT_ACTIONS, cum_weights=ACTION_CUM)[0]
        ts += rng.randrange(1, 600_000)
        out.append(encode(Event(f"e{u:06d}-{k:05d}", user, item, scene, action, ts)))
    return out


def packed_form(events: Iterable[Event], length: int) -> dict:
    """The worker's state: scene -> packed Window, built by the worker's own join."""
    state, _, _ = apply_user({}, events, length)
    return state


def object_form(events: Iterable[Event], length: int) -> dict:
    """The state before packing: scene -> tuple of the Event objects themselves (distinct events here, so the
    newest `length` of each scene is what the old join kept)."""
    by_scene: dict[str, list[Event]] = {}
    for e in events:
        by_scene.setdefault(e.scene, []).append(e)
    return {s: tuple(sorted(evs, key=Event.order_key.fget)[-length:]) for s, evs in by_scene.items()}


FORMS: dict[str, Callable[[Iterable[Event], int], dict]] = {"packed": packed_form, "object": object_form}


def live_events(payloads: list[bytes], config: StreamConfig) -> list[Event]:
    """What the worker decodes from the clicks topic: every field a private object."""
    return [decode(p, config) for p in payloads]


def recovered_events(payloads: list[bytes], config: StreamConfig, length: int) -> list[Event]:
    """What recovery reads back from the changelog: one record per window, through decode_state."""
    events = live_events(payloads, config)
    user = events[0].user_id
    records = [encode_state({s: w}) for s, w in packed_form(events, length).items()]
    del events
    return [e for raw in records for w in decode_state(user, raw, length).values() for e in w.events(user)]


PATHS = {"live": live_events, "recovered": recovered_events}


def _breakdown(users: dict[str, dict]) -> dict:
    """sys.getsizeof per kind of object, each distinct object counted once (under the kind it was first met as);
    refs against distinct says which objects are shared."""
    size, refs, seen = Counter(), Counter(), set()
    distinct: dict[str, set] = {}

    def add(kind: str, obj) -> None:
        refs[kind] += 1
        distinct.setdefault(kind, set()).add(id(obj))
        if id(obj) not in seen:
            seen.add(id(obj))
            size[kind] += sys.getsizeof(obj)

    add("dict: user -> state (outer map)", users)
    for state in users.values():
        add("dict: scene -> window (UserState)", state)
        for scene, window in state.items():
            add("str: scene (state key)", scene)
            if isinstance(window, Window):
                add("Window object", window)
                add("bytes: rows and ids", window.buf)
                continue
            add("tuple: window", window)
            for e in window:
                add("Event instance", e)
                for field in ("event_id", "user_id", "item_id", "scene", "action"):
                    add(f"str: {field}", getattr(e, field))
                add("int: ts", e.ts)
    return {k: {"bytes": size[k], "refs": refs[k], "distinct": len(distinct[k])} for k in refs}


def ram_per_window(form: str, path: str, n_users: int, scenes: tuple[str, ...], length: int,
                   config: StreamConfig, seed: int) -> dict:
    rng = random.Random(seed)
    payloads = [user_payloads(u, scenes, length, rng) for u in range(n_users)]
    build = FORMS[form]
    make = PATHS[path]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    users: dict[str, dict] = {}
    for u, p in enumerate(tqdm(payloads, desc=f"RAM sample {form}/{path}", unit="user", file=sys.stderr,
                               mininterval=0.5)):
        events = make(p, config, length) if path == "recovered" else make(p, config)
        users[f"u{u:06d}"] = build(events, length)
        del events
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    windows = sum(len(s) for s in users.values())
    assert all(len(w) == length for s in users.values() for w in s.values()), "windows are not full"
    kinds = _breakdown(users)
    window_only = sum(v["bytes"] for k, v in kinds.items() if "dict" not in k and k != "str: scene (state key)")
    out = {"tracemalloc_bytes_per_window": round(held / windows),
           "tracemalloc_bytes_per_event": round(held / windows / length, 1),
           "getsizeof_bytes_per_window": round(sum(v["bytes"] for v in kinds.values()) / windows),
           "getsizeof_window_only_bytes_per_window": round(window_only / windows),
           "breakdown_bytes_per_window": {k: round(v["bytes"] / windows, 1) for k, v in
                                          sorted(kinds.items(), key=lambda kv: -kv[1]["bytes"])},
           "objects": {k: f"{v['refs']} refs, {v['distinct']} distinct" for k, v in kinds.items()},
           "windows": windows}
    if path == "live" and form == "packed":   # the changelog holds the worker's packed windows
        out["changelog_bytes_per_window"] = round(sum(len(encode_state({s: w})) + len(state_key(u, s))
                                                      for u, st in users.items() for s, w in st.items()) / windows, 1)
    return out


def _vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def build_rss(form: str, n_users: int, scenes: tuple[str, ...], length: int, budget: int, chunk: int,
              seed: int) -> dict:
    """In a child process: build users (live path) in chunks until N or the RSS budget; VmRSS before and after."""
    config = StreamConfig(scenes=scenes, window=length)
    build = FORMS[form]
    rng = random.Random(seed)
    user_payloads(0, scenes, length, rng)   # warm every code path before the baseline
    gc.collect()
    baseline = _vm_rss()
    users: dict[str, dict] = {}
    bar = tqdm(total=n_users, desc=f"RSS build {form}", unit="user", file=sys.stderr, mininterval=1.0)
    t0, stopped = time.time(), False
    while len(users) < n_users:
        n = min(chunk, n_users - len(users))
        if users:
            per_user = (_vm_rss() - baseline) / len(users)
            if _vm_rss() + per_user * n * 1.05 > baseline + budget:
                stopped = True
                break
        for u in range(len(users), len(users) + n):
            users[f"u{u:06d}"] = build(live_events(user_payloads(u, scenes, length, rng), config), length)
        bar.update(n)
        bar.set_postfix(rss_gb=f"{(_vm_rss() - baseline) / 2**30:.2f}")
    bar.close()
    gc.collect()
    used = _vm_rss() - baseline
    built = len(users)
    out = {"users_built": built, "rss_baseline_bytes": baseline, "rss_held_bytes": used,
           "rss_bytes_per_user": round(used / built), "rss_bytes_per_window": round(used / built / len(scenes)),
           "rss_for_users_bytes": round(used / built * n_users), "build_seconds": round(time.time() - t0, 1)}
    if stopped:
        out["extrapolated_from_users"] = built
    return out


def machine() -> dict:
    mem = _meminfo()
    return {"cpus": os.cpu_count(), "mem_total_gib": round(mem["MemTotal"] / 2**30, 1),
            "mem_available_gib": round(mem["MemAvailable"] / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000, help="Users held in state for the RSS figure.")
    ap.add_argument("--events-per-window", type=int, default=50, help="L: events per (full) window.")
    ap.add_argument("--scenes", type=int, default=3, help="Scenes per user, each with a full window.")
    ap.add_argument("--sample-users", type=int, default=2000, help="Users in the tracemalloc sample.")
    ap.add_argument("--max-rss-gb", type=float, default=None,
                    help="RSS budget of the build (GB, 1e9 bytes; default 70%% of MemAvailable).")
    ap.add_argument("--chunk", type=int, default=10_000, help="Users built between two RSS checks.")
    ap.add_argument("--forms", nargs="+", default=["packed"], choices=list(FORMS),
                    help="packed: the worker's windows; object: tuples of Event objects, the state before packing.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    scenes, length = _scenes(args.scenes), args.events_per_window
    config = StreamConfig(scenes=scenes, window=length)
    budget = int(args.max_rss_gb * 1e9) if args.max_rss_gb else int(0.7 * _meminfo()["MemAvailable"])
    result = {"form": {}, "users": args.users, "window": length, "scenes": len(scenes),
              "sample_users": args.sample_users, "rss_budget_bytes": budget, "machine": machine(),
              "command": "python " + shlex.join(sys.argv)}
    ctx = multiprocessing.get_context("spawn")
    for form in args.forms:
        figures = {path: ram_per_window(form, path, args.sample_users, scenes, length, config, args.seed)
                   for path in PATHS}
        # the changelog holds packed windows only: for the object form (the state before packing) there is none
        figures["changelog_bytes_per_window"] = figures["live"].pop("changelog_bytes_per_window", None)
        gc.collect()
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:   # a fresh process: the parent's allocations do not count
            figures["rss"] = pool.submit(build_rss, form, args.users, scenes, length, budget, args.chunk,
                                         args.seed).result()
        result["form"][form] = figures
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.users} users x {len(scenes)} scenes x {length} events; machine {result['machine']}")
    for form, f in result["form"].items():
        rss = f["rss"]
        print(f"[{form}]")
        for path in PATHS:
            print(f"  RAM per window ({path:9s}) {f[path]['tracemalloc_bytes_per_window']:>8} B "
                  f"({f[path]['tracemalloc_bytes_per_event']} B/event)")
        if f["changelog_bytes_per_window"] is not None:
            print(f"  changelog per window        {f['changelog_bytes_per_window']:>8} B")
        note = f" (extrapolated from {rss['extrapolated_from_users']} users)" if "extrapolated_from_users" in rss else ""
        print(f"  RSS per window              {rss['rss_bytes_per_window']:>8} B")
        print(f"  RSS for {args.users} users      {rss['rss_for_users_bytes'] / 2**30:8.2f} GiB{note}")
        print("  breakdown (live, B/window): " + ", ".join(
            f"{k} {v}" for k, v in f["live"]["breakdown_bytes_per_window"].items()))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
