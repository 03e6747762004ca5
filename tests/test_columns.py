"""Event logs with other column names and time forms, Parquet among them (stream/offline/columns.py): the same events
and the same rejections as the equivalent JSONL, through `replay` itself; Parquet read a batch at a time."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import textwrap

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scenestream.stream.core.config import StreamConfig
from scenestream.stream.core.events import Event, Rejection
from scenestream.stream.offline.columns import epoch_ms, parse_columns
from scenestream.stream.offline.logs import LogInput, decode_log, load_events

COLUMNS = "event_id=eid,user_id=uid,item_id=item,scene=surface,action=act,ts=when"
RENAME = dict(parse_columns(COLUMNS))


def test_column_mapping_and_time_forms():
    assert parse_columns("user_id=uid, ts=event_time") == {"user_id": "uid", "ts": "event_time"}
    for bad in ("user_id", "uid=user_id", "user_id=a,user_id=b", "ts="):
        with pytest.raises(ValueError):
            parse_columns(bad)
    ms = 1_767_225_600_123
    assert epoch_ms(ms, "auto") == epoch_ms(ms, "ms") == ms
    assert epoch_ms(ms // 1000, "auto") == epoch_ms(ms // 1000, "s") == ms - 123
    assert epoch_ms(str(ms // 1000), "s") == ms - 123 and epoch_ms(1_767_225_600.5, "s") == ms - 123 + 500
    assert epoch_ms("2026-01-01T00:00:00.123Z", "auto") == epoch_ms("2026-01-01T01:00:00.123+01:00", "iso") == ms
    assert epoch_ms(dt.datetime(2026, 1, 1, 0, 0, 0, 123000), "auto") == ms   # naive: UTC
    for bad in ("yesterday", True, None):   # left as they were: the event rules reject them
        assert epoch_ms(bad, "auto") == bad


def _rows(n=400):
    """Events of 40 users over 3 scenes, times whole seconds (a seconds column holds them exactly), and bad rows:
    a missing user, an unknown scene, a time in no accepted form, an empty item."""
    t0 = 1_767_225_600_000
    rows = [dict(event_id=f"e{k}", user_id=f"u{k % 40}", item_id=f"i{k % 23}", scene=("video", "article", "shop")[k % 3],
                 action=("click", "view", "buy")[k % 3], ts=t0 + 1000 * ((k * 7919) % 5000)) for k in range(n)]
    rows[5].pop("user_id")
    rows[17]["scene"] = "radio"
    rows[33]["ts"] = "yesterday"
    rows[50]["item_id"] = ""
    return rows


def _jsonl(rows, path):
    path.write_bytes(b"".join(orjson.dumps({k: v for k, v in r.items() if v != ""}) + b"\n" for r in rows))


def _parquet(rows, path, ts):
    """The rows under the file's own names, with ts as `ts` gives it; row groups of 64 rows."""
    table = {RENAME[f]: [r.get(f) or None if f != "ts" else ts(r.get(f)) for r in rows] for f in RENAME}
    pq.write_table(pa.table(table), path, row_group_size=64)


def _seconds(v):
    return v // 1000 if isinstance(v, int) else None   # a bad time cannot be an integer column: left empty


def _iso(v):
    return dt.datetime.fromtimestamp(v / 1000, dt.timezone.utc).isoformat() if isinstance(v, int) else v


def _replay(checkpoint, *args):
    out = subprocess.run([sys.executable, "-m", "scenestream.stream.cli", "replay", "--checkpoint", str(checkpoint),
                          "--json", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: v for k, v in report.items() if k not in ("wall_s", "events_per_s")}


def test_parquet_with_other_names_seconds_and_iso_times_replays_as_the_jsonl(checkpoint, tmp_path):
    rows = _rows()
    _jsonl(rows, tmp_path / "log.jsonl")
    _parquet(rows, tmp_path / "seconds.parquet", _seconds)
    _parquet(rows, tmp_path / "iso.parquet", _iso)
    bad_int = [dict(r) for r in rows]
    bad_int[33].pop("ts")   # the seconds file cannot hold "yesterday": its row 33 has no time
    _jsonl(bad_int, tmp_path / "log_missing_ts.jsonl")
    want = _replay(checkpoint, "--input", tmp_path / "log.jsonl")
    assert want["invalid"] == 4 and want["events"] == len(rows) - 4
    assert _replay(checkpoint, "--input", tmp_path / "iso.parquet", "--columns", COLUMNS) == want
    seconds = _replay(checkpoint, "--input", tmp_path / "seconds.parquet", "--columns", COLUMNS)
    assert seconds == _replay(checkpoint, "--input", tmp_path / "log_missing_ts.jsonl")
    assert seconds["invalid_by_reason"]["missing_field"] == 3
    # the mapping read the same events, row by row, in the same order
    config = StreamConfig()
    plain = list(decode_log(tmp_path / "log.jsonl", config))
    iso = list(decode_log(LogInput(str(tmp_path / "iso.parquet"), tuple(RENAME.items())), config))
    assert [type(d) for d in plain] == [type(d) for d in iso]
    assert [d for d in plain if isinstance(d, Event)] == [d for d in iso if isinstance(d, Event)]
    assert [d.reason for d in plain if isinstance(d, Rejection)] == [d.reason for d in iso if isinstance(d, Rejection)]
    # without the mapping the file's own names are no event fields: every row is rejected, none is guessed
    unmapped = load_events(input_path=LogInput(str(tmp_path / "iso.parquet")))
    assert not unmapped.events and unmapped.invalid["missing_field"] == len(rows)


STREAMING = textwrap.dedent("""
    import resource, sys
    from scenestream.stream.core.config import StreamConfig
    from scenestream.stream.core.events import Event
    from scenestream.stream.offline.logs import LogInput, decode_log, raw_lines
    config = StreamConfig()
    source = LogInput(sys.argv[1], (("user_id", "uid"),), "s")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = sum(isinstance(d, Event) for d in decode_log(source, config))
    sent = sum(1 for _ in raw_lines(input_path=source))   # what `produce` sends
    print(n, sent, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_a_parquet_log_larger_than_the_memory_budget_is_read_as_a_stream(tmp_path):
    """1.2M rows: as Python rows they would take over a GB; read a batch at a time, by replay's decoder and by
    produce's payloads, the reader's peak RSS grows by less than MEMORY_BUDGET_MB."""
    budget_mb, chunk, chunks = 200, 100_000, 12
    path = tmp_path / "big.parquet"
    schema = pa.schema([("event_id", pa.string()), ("uid", pa.string()), ("item_id", pa.string()),
                        ("scene", pa.string()), ("action", pa.string()), ("ts", pa.int64())])
    with pq.ParquetWriter(path, schema) as w:
        for c in range(chunks):
            ids = range(c * chunk, (c + 1) * chunk)
            w.write_table(pa.table({"event_id": [f"event-{i:09d}" for i in ids], "uid": [f"user-{i % 50_000}" for i in ids],
                                    "item_id": [f"item-{i % 7_919}" for i in ids],
                                    "scene": pa.array(["video", "article", "shop"] * (chunk // 3) + ["video"] * (chunk % 3)),
                                    "action": pa.array(["click"] * chunk), "ts": pa.array([1_767_225_600 + i for i in ids])},
                                   schema=schema), row_group_size=20_000)
    out = subprocess.run([sys.executable, "-c", STREAMING, str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    n, sent, before_kb, peak_kb = map(int, out.stdout.split())
    assert n == sent == chunk * chunks
    assert (peak_kb - before_kb) / 1024 < budget_mb, (before_kb, peak_kb)
