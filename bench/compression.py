"""Bytes and CPU per record of what the worker writes, for each codec a Kafka record batch may use.

The worker's two records per touched user, made by its own code (core/output.py, stream/live/state.py) from the default
synthetic stream: the output record (JSON or binary, mostly float vectors) and the changelog value of each changed
window.
Micro-batches of --batch events are applied, encoded and cut into one record batch per partition of --partitions,
as the worker sends them (stream/live/record_batches.py), with aiokafka's own batch builder and each codec. Reported per
record: bytes as stored (the batch's size on the wire and in the broker, headers included), CPU to build the
batches (the producer's side: append and compress), CPU to read them back (the consumer's side: decompress and
iterate). CPU is process time, the best of --repeat runs.

    python bench/compression.py                      # a tiny checkpoint, trained first (~20 s)
    python bench/compression.py --checkpoint CKPT --events 20000 --json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def records_of(checkpoint: str, n_events: int, batch: int, partitions: int) -> dict[str, list[list[tuple]]]:
    """{kind: [micro-batch: [(partition, key, value)]]} for the output records (both forms) and the changelog
    values, made by the worker's own calls (stream/live/state.py's join and cut, core/slot_step.py, core/output.py)."""
    from scenestream.model.checkpoint import load_checkpoint
    from scenestream.model.infer import InterestEncoder
    from scenestream.model.slot_encoder import SlotEncoder
    from scenestream.stream.core.output import FORMATS, encode_records
    from scenestream.stream.core.slot_step import encode
    from scenestream.stream.datasets.synthetic import SyntheticSpec, generate
    from scenestream.stream.live.record_batches import key_partitions
    from scenestream.stream.live.state import ChangelogStore

    encoder = InterestEncoder(load_checkpoint(checkpoint), "cpu")
    streamer = SlotEncoder(encoder, encoder.cache_mb)
    events = generate(SyntheticSpec())[0][:n_events]
    store = ChangelogStore("unused:9092", "unused", encoder.scenes, encoder.window)   # join and cut: no broker
    out: dict[str, list[list[tuple]]] = {f"output ({fmt})": [] for fmt in FORMATS}
    out["changelog"] = []
    for start in range(0, len(events), batch):
        joined = store.join(0, events[start:start + batch], start)
        written = store.cut(0, joined)
        vec = encode(store.slots, joined.users, streamer)
        names = [store.slots.user_names[u] for u in vec.users.tolist()]
        keys = [name.encode() for name in names]
        spread = key_partitions(keys, partitions)
        for fmt in FORMATS:
            values = encode_records(fmt, names, vec, encoder.scenes, encoder.version)
            out[f"output ({fmt})"].append(list(zip(spread, keys, values)))
        user_keys = [key.split(b"\x1f", 1)[0] for key, _ in written.records]
        out["changelog"].append([(p, key, value) for (key, value), p in zip(written.records,
                                                                            key_partitions(user_keys, partitions))])
    return out


def measure(batches: list[list[tuple]], codec: str, repeat: int) -> dict:
    """Bytes and CPU per record of `batches` cut into record batches with `codec`."""
    from aiokafka.producer.message_accumulator import BatchBuilder
    from aiokafka.record.memory_records import MemoryRecords

    from aiokafka.producer.producer import AIOKafkaProducer

    from scenestream.stream.live.record_batches import codec_setting
    setting = codec_setting(codec)
    compression = AIOKafkaProducer._COMPRESSORS[setting][1] if setting else 0   # the batch attribute's codec bits
    n = sum(len(b) for b in batches)
    payload = sum(len(k) + len(v) for b in batches for _, k, v in b)
    best_build, best_read, size = float("inf"), float("inf"), 0
    for _ in range(repeat):
        t0 = time.process_time()
        built = []
        for micro in batches:
            open_: dict = {}
            for partition, key, value in micro:
                builder = open_.get(partition)
                if builder is None:
                    builder = open_[partition] = BatchBuilder(1 << 20, compression)
                if builder.append(key=key, value=value, timestamp=None) is None:
                    built.append(builder._build())
                    builder = open_[partition] = BatchBuilder(1 << 20, compression)
                    builder.append(key=key, value=value, timestamp=None)
            built += [b._build() for b in open_.values()]
        t1 = time.process_time()
        read = 0
        for raw in built:
            records = MemoryRecords(bytes(raw))
            while records.has_next():
                for record in records.next_batch():
                    read += len(record.value)
        t2 = time.process_time()
        best_build, best_read = min(best_build, t1 - t0), min(best_read, t2 - t1)
        size = sum(len(raw) for raw in built)
    return {"codec": codec, "records": n, "payload_bytes_per_record": payload / n, "bytes_per_record": size / n,
            "ratio": payload / size, "build_us_per_record": best_build / n * 1e6,
            "read_us_per_record": best_read / n * 1e6}


def main() -> None:
    from scenestream.stream.core.config import CODECS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model whose records are measured (default: a tiny one, trained now)")
    ap.add_argument("--events", type=int, default=20_000, help="events of the default synthetic stream")
    ap.add_argument("--batch", type=int, default=2000, help="events per micro-batch")
    ap.add_argument("--partitions", type=int, default=4, help="partitions the records are spread over")
    ap.add_argument("--repeat", type=int, default=3, help="runs per codec; the best CPU time counts")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args()
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    from harness import checkpoint_or_tiny
    checkpoint = checkpoint_or_tiny(args.checkpoint, say)
    kinds = records_of(checkpoint, args.events, args.batch, args.partitions)
    results = {kind: [measure(batches, codec, args.repeat) for codec in CODECS] for kind, batches in kinds.items()}
    if args.json:
        print(json.dumps({"events": args.events, "batch": args.batch, "results": results}, indent=1))
        return
    for kind, rows in results.items():
        say(f"\n{kind} records ({rows[0]['records']}, {rows[0]['payload_bytes_per_record']:.0f} bytes of key and "
            f"value each)")
        say(f"{'codec':<8}{'bytes/record':>14}{'ratio':>8}{'build us/rec':>14}{'read us/rec':>13}")
        for r in rows:
            say(f"{r['codec']:<8}{r['bytes_per_record']:>14.0f}{r['ratio']:>8.2f}{r['build_us_per_record']:>14.1f}"
                f"{r['read_us_per_record']:>13.1f}")


if __name__ == "__main__":
    main()
