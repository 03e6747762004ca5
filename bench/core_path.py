"""The worker's per-batch core without Kafka, stage by stage: decode, join (windows, item deltas, popularity), encode
(the vectors, kept for serving), output (the output records' values, --output-format), changelog (its values);
what MicroBatchService does between the consumer and the producer, on the synthetic log. CPU time (process time) per event, for two kinds of batches:

  backlog  the log as the live worker meets a backlog: each batch up to --batch events of one of 4 partitions (users
           hashed), in order, so ~10 events per touched user (the first 2 batches, cold, left out)
  fresh    then --fresh-batches batches of --fresh-users events, one per user, each newer than the user's window:
           what steady live traffic gives, and what the freshness check meets

On a shared machine the same code measures +-15% from run to run, which hides a change of a few percent. With
--against DIR (a checkout of another commit, e.g. `git worktree add /tmp/base COMMIT`), that checkout's code runs
the same batches in a second process, the two taking turns batch by batch, so both see the same machine:

    python bench/core_path.py [--checkpoint CKPT] [--against /tmp/base] [--json]
    python bench/core_path.py --events 4000 --batch 500 --fresh-batches 2 --fresh-users 50   # a smoke run
    python bench/core_path.py --encoder-cache-mb 2 --against /tmp/base   # fresh windows all misses
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("decode", "join", "encode", "output", "changelog")


def _run_side(args) -> dict:
    """One side: build the batches, then run them, each after a token on fd IN, passing it on to fd OUT."""
    import torch
    from scenestream.model.checkpoint import load_checkpoint
    from scenestream.model.infer import InterestEncoder
    from scenestream.stream.core.config import StreamConfig
    from scenestream.stream.core.events import Event, check_key, decode, encode
    from scenestream.stream.core.popularity import Popularity
    try:   # this checkout's layout, else that of one from before stream/ had layer folders (--against)
        from scenestream.stream.datasets.synthetic import SyntheticSpec, generate
    except ImportError:
        from scenestream.stream.synthetic import SyntheticSpec, generate

    torch.set_num_threads(1)   # the worker's default (stream/cli/common.py)
    cfg = StreamConfig.from_env()
    cache = {} if args.encoder_cache_mb is None else {"cache_mb": args.encoder_cache_mb}
    encoder = InterestEncoder(load_checkpoint(args.checkpoint), device="cpu", **cache)
    events, _ = generate(SyntheticSpec())
    if args.events:
        events = events[:args.events]
    rng = random.Random(0)
    part = {u: rng.randrange(4) for u in sorted({e.user_id for e in events})}
    records = [[(e.user_id.encode(), encode(e)) for e in events if part[e.user_id] == p] for p in range(4)]
    backlog = [rs[i:i + args.batch] for rs in records for i in range(0, len(rs), args.batch)]
    users, ts, item_of = sorted(part), max(e.ts for e in events) + 1000, [e.item_id for e in events[-5000:]]
    fresh = []
    for b in range(args.fresh_batches):
        batch = []
        for k, user in enumerate(rng.sample(users, args.fresh_users)):
            ts += 1
            e = Event(f"fresh-{b}-{k}", user, rng.choice(item_of), rng.choice(cfg.scenes), "view", ts)
            batch.append((user.encode(), encode(e)))
        fresh.append(batch)

    not_after = ts + 3_600_000

    def decoded(batch) -> list:
        good = []
        for key, raw in batch:
            got = decode(raw, cfg, not_after_ms=not_after)
            if isinstance(got, Event) and check_key(key, got) is None:
                good.append(got)
        return good

    try:   # the worker's own calls on slots (MicroBatchService._apply, _encode, _publish)
        from scenestream.stream.core.output import encode_records
        from scenestream.stream.core.slot_step import encode as encode_slots
        from scenestream.stream.live.state import ChangelogStore, item_deltas
        from scenestream.stream.live.shared_popularity import SharedPopularity
    except ImportError:   # --against a checkout from before slots
        encode_slots = None

    if encode_slots is not None:
        import numpy as np
        from scenestream.model.slot_encoder import SlotEncoder
        from scenestream.stream.core.vector_table import VectorTable
        from scenestream.stream.live.heap import FrozenHeap
        heap = FrozenHeap()
        store = ChangelogStore("unused:9092", "unused", encoder.scenes, encoder.window)   # join and cut: no broker
        streamer = SlotEncoder(encoder, encoder.cache_mb)
        shared = SharedPopularity(encoder.scenes, "unused:9092", {})
        shared.hold(0, Popularity())
        table = VectorTable(encoder.scenes, streamer.width)

        def step(batch) -> list[float]:
            t0 = time.process_time()
            good = decoded(batch)
            t1 = time.process_time()
            joined = store.join(0, good, 0)
            for scene, delta in item_deltas(store.slots, joined).items():
                shared.shift(0, scene, delta)
            t2 = time.process_time()
            vec = encode_slots(store.slots, joined.users, streamer)
            names = [store.slots.user_names[u] for u in vec.users.tolist()]
            table.put(vec.users, store.slots.uver[vec.users], vec, np.arange(len(names)), encoder.version, 0.0)
            t3 = time.process_time()
            encode_records(args.output_format, names, vec, encoder.scenes, encoder.version)
            t4 = time.process_time()
            store.cut(0, joined)
            t5 = time.process_time()
            heap.settle()   # as the worker does once a batch is durable
            return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4]
    else:
        from scenestream.stream.core.batch import apply_batch, interest_records, record_json
        from scenestream.stream.core.window import item_delta
        try:
            from scenestream.stream.live.changelog import encode_state
        except ImportError:
            from scenestream.stream.state import encode_state
        states: dict = {}
        popularity = Popularity()

        def step(batch) -> list[float]:
            t0 = time.process_time()
            good = decoded(batch)
            t1 = time.process_time()
            old: dict = {}
            outcome = apply_batch(lambda user: old.setdefault(user, states.get(user)), good, cfg.window)
            changed = []   # MicroBatchService._apply's loop as it was, written out
            for user, state in outcome.updates.items():
                before = old.get(user) or {}
                for scene, window in state.items():
                    if window is not before.get(scene):
                        changed.append((scene, window))
                        popularity.shift(scene, item_delta(before.get(scene), window))
            states.update(outcome.updates)
            t2 = time.process_time()
            recs = interest_records(encoder, outcome.updates)
            t3 = time.process_time()
            for rec in recs:
                record_json(rec)
            t4 = time.process_time()
            for scene, window in changed:
                encode_state({scene: window})
            t5 = time.process_time()
            gc.freeze()   # as the worker does once a batch is durable
            return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4]

    out = {}
    for kind, batches, skip in (("backlog", backlog, 2), ("fresh", fresh, 0)):
        total, n = [0.0] * len(STAGES), 0
        for i, batch in enumerate(batches):
            if args.token_in is not None:
                os.read(args.token_in, 1)
            spent = step(batch)
            if args.token_out is not None:
                os.write(args.token_out, b"t")
            if i >= skip:
                total, n = [a + b for a, b in zip(total, spent)], n + len(batch)
        out[kind] = {"events": n, "cpu_us_per_event": 1e6 * sum(total) / n,
                     **{f"{s}_us": 1e6 * t / n for s, t in zip(STAGES, total)}}
    return out


def _lockstep(args, checkpoint: str) -> dict:
    """This checkout and --against, as two child processes taking turns batch by batch."""
    a_in, b_out = os.pipe()
    b_in, a_out = os.pipe()
    common = [sys.executable, __file__, "--checkpoint", checkpoint, "--batch", str(args.batch), "--fresh-batches",
              str(args.fresh_batches), "--fresh-users", str(args.fresh_users), "--events", str(args.events),
              "--output-format", args.output_format,
              *(["--encoder-cache-mb", str(args.encoder_cache_mb)] if args.encoder_cache_mb is not None else []),
              "--side"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {}
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "pkg"
        pkg.mkdir()
        (pkg / "scenestream").symlink_to(Path(args.against).resolve())   # the package is the checkout's root
        for name, fds, extra in (("against", (a_in, a_out), {"PYTHONPATH": str(pkg)}), ("this", (b_in, b_out), {})):
            out = open(Path(tmp) / name, "w+")
            procs[name] = (subprocess.Popen([*common, str(fds[0]), str(fds[1])], env={**env, **extra},
                                            pass_fds=fds, stdout=out), out)
        os.write(b_out, b"t")   # --against goes first
        results = {}
        for name, (proc, out) in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"the {name} side failed")
            out.seek(0)
            results[name] = json.loads(out.read().strip().splitlines()[-1])
            out.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="Checkpoint to encode with (default: bench/tiny_checkpoint.py's, trained "
                                         "now, ~20 s).")
    ap.add_argument("--against", help="A checkout of another commit, run side by side (lockstep).")
    ap.add_argument("--batch", type=int, default=5000, help="Backlog batch size (default 5000, the worker's "
                                                             "--batch-max).")
    ap.add_argument("--events", type=int, default=0, help="Backlog: only the first N events of the synthetic log "
                                                           "(default 0: all of it, ~119k).")
    ap.add_argument("--fresh-batches", type=int, default=40, help="Fresh batches (default 40).")
    ap.add_argument("--fresh-users", type=int, default=300, help="Events (users) per fresh batch (default 300).")
    ap.add_argument("--output-format", default="binary", choices=("json", "binary"),
                    help="Form of the output records (the worker's --output-format, and its default: binary). A "
                         "checkout from before binary records writes json whatever this says.")
    ap.add_argument("--encoder-cache-mb", type=float, help="The encoder cache's budget (default: the worker's, "
                    "256 MB, which holds every window of the log's 2,000 users). A small one (2) makes every fresh "
                    "window a miss, encoded whole: what most events meet with ~100,000 users and the default cache.")
    ap.add_argument("--side", nargs=2, type=int, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="One JSON object on stdout.")
    args = ap.parse_args()
    args.token_in, args.token_out = args.side or (None, None)
    if args.side:
        print(json.dumps(_run_side(args)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if not args.checkpoint:
        from tiny_checkpoint import tiny_checkpoint
        args.checkpoint = tiny_checkpoint()
    results = _lockstep(args, args.checkpoint) if args.against else {"this": _run_side(args)}
    if args.json:
        print(json.dumps(results))
        return
    for name, r in results.items():
        for kind, m in r.items():
            print(f"{name:8s} {kind:8s} {m['cpu_us_per_event']:7.1f} CPU us/event  ("
                  + ", ".join(f"{s} {m[s + '_us']:.1f}" for s in STAGES) + f"; {m['events']:,} events)")


if __name__ == "__main__":
    main()
