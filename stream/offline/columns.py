"""Event logs whose columns have other names and whose times other forms: the mapping (`--columns`), the time forms
(`--ts-format`), and Parquet read as a stream of rows.

A data team's clickstream history is rarely in the event schema's names: `--columns user_id=uid,ts=event_time`
says which column holds which event field (fields not named keep their own names). A row, renamed and its time made
epoch milliseconds, is then judged by the same rules, with the same rejection reasons, as a JSON event
(core/events.py: `validate_record`). Parquet is read a row group at a time (`iter_batches`), never whole.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Iterator, Optional

FIELDS = ("event_id", "user_id", "item_id", "scene", "action", "ts")
TS_FORMATS = ("auto", "ms", "s", "iso")
# auto: an integer below this is seconds, else milliseconds (1e11 ms is 1973-03-03; 1e11 s is the year 5138); a
# string is ISO-8601; a Parquet timestamp column is exact in any unit
SECONDS_BELOW = 100_000_000_000
PARQUET_ROWS = 65_536   # rows per batch read: bounds memory whatever the file's size


def parse_columns(text: Optional[str]) -> dict[str, str]:
    """'user_id=uid,ts=event_time' -> {"user_id": "uid", "ts": "event_time"}; ValueError says what is wrong."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        field, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not column:
            raise ValueError(f"--columns wants FIELD=COLUMN pairs, got {part!r}")
        if field not in FIELDS:
            raise ValueError(f"--columns: {field!r} is no event field (fields: {', '.join(FIELDS)})")
        if field in out:
            raise ValueError(f"--columns names {field!r} twice")
        out[field] = column
    return out


def epoch_ms(value: Any, ts_format: str) -> Any:
    """An event time in any accepted form -> epoch ms (an int); a value in no accepted form comes back as it was,
    for the event rules to reject (wrong_type, ts_out_of_range) as they would in JSON."""
    if isinstance(value, dt.datetime):   # a Parquet timestamp column; naive means UTC
        value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return int(round(value.timestamp() * 1000))
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and ts_format in ("auto", "iso"):
        if ts_format == "auto" and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            try:
                return epoch_ms(dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")), ts_format)
            except ValueError:
                return value
    if isinstance(value, str) and ts_format in ("ms", "s"):
        try:
            value = int(value)
        except ValueError:
            return value
    if isinstance(value, int):
        seconds = ts_format == "s" or (ts_format == "auto" and abs(value) < SECONDS_BELOW)
        return value * 1000 if seconds else value
    if isinstance(value, float) and value == value and ts_format in ("auto", "s", "ms"):
        seconds = ts_format == "s" or (ts_format == "auto" and abs(value) < SECONDS_BELOW)
        return int(round(value * 1000)) if seconds else int(round(value))
    return value


def event_row(row: dict, columns: dict[str, str], ts_format: str) -> dict:
    """A row as an event: the event fields only, each from its mapped column (else the column of its own name), empty
    cells left out (a missing field, as in CSV), the time made epoch ms."""
    out = {}
    for field in FIELDS:
        v = row.get(columns.get(field, field))
        if v is not None and v != "":
            out[field] = v
    if "ts" in out:
        out["ts"] = epoch_ms(out["ts"], ts_format)
    return out


def parquet_rows(path: Path, progress: bool = False) -> Iterator[dict]:
    """The rows of a Parquet file as dicts, a batch at a time; a bar on stderr with `progress`."""
    import pyarrow.parquet as pq
    from tqdm import tqdm
    f = pq.ParquetFile(path)
    with tqdm(total=f.metadata.num_rows, unit="row", desc=f"reading {path.name}", disable=not progress,
              leave=False) as bar:
        for batch in f.iter_batches(batch_size=PARQUET_ROWS):
            yield from batch.to_pylist()
            bar.update(batch.num_rows)
