"""Event logs and named data sets -> decoded events, with every rejected line counted by reason.

JSONL lines are decoded exactly like Kafka message values (`events.decode`); CSV rows (header: the event fields)
go through the same validation after `ts` is read as an integer. Parquet rows, and the rows of any log given a
column mapping or a time form (`LogInput`), are renamed and their times made epoch ms first (columns.py).
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import orjson

from ..core.config import DEFAULT_ACTIONS, StreamConfig
from ..core.events import Decoded, Event, Rejection, decode, encode, validate_record
from .columns import TS_FORMATS, event_row, parquet_rows

if TYPE_CHECKING:
    from ..datasets.synthetic import SyntheticSpec

DATASETS = ("synthetic", "ml-1m", "ml-1m-5core", "ml-100k")


@dataclass
class LoadedEvents:
    events: list[Event]                       # valid events, in log order
    scenes: tuple[str, ...]
    actions: tuple[str, ...] = DEFAULT_ACTIONS          # the vocabulary the events were decoded with
    invalid: Counter = field(default_factory=Counter)   # reason -> count

    @property
    def n_invalid(self) -> int:
        return sum(self.invalid.values())


@dataclass(frozen=True)
class LogInput:
    """--input with how to read it: `columns` maps event fields to the file's column names, `ts_format` says what
    its times are (columns.py). A plain path reads the event schema as it is."""
    path: str
    columns: tuple[tuple[str, str], ...] = ()
    ts_format: str = "auto"

    def __post_init__(self):
        if self.ts_format not in TS_FORMATS:
            raise ValueError(f"--ts-format must be one of {', '.join(TS_FORMATS)}")

    def __str__(self) -> str:
        return self.path

    @property
    def mapped(self) -> bool:
        """Rows go through the mapping and the time forms: Parquet always, other logs when asked to."""
        return bool(self.columns) or self.ts_format != "auto" or is_parquet(self.path)


def as_input(source: "str | Path | LogInput") -> LogInput:
    return source if isinstance(source, LogInput) else LogInput(str(source))


def is_parquet(path: "str | Path") -> bool:
    return Path(path).suffix.lower() in (".parquet", ".pq")


def read_raw(path: str | Path) -> Iterator[bytes]:
    """JSONL: one raw payload per non-empty line (the newline stripped)."""
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line


def _csv_rows(path: Path, config: StreamConfig) -> Iterator[Decoded]:
    for row in _csv_dicts(path):
        if isinstance(row, Rejection):
            yield row
            continue
        row = {k: v for k, v in row.items() if v not in (None, "")}
        ts = row.get("ts")
        if isinstance(ts, str):
            try:
                row["ts"] = int(ts)
            except ValueError:
                yield Rejection("wrong_type", f"ts {ts[:32]!r} is not an integer")
                continue
        yield validate_record(row, config)


def _mapped_rows(source: LogInput, progress: bool = False) -> Iterator[object]:
    """Each row of a mapped log renamed and its time made epoch ms; a line or row that is no object as it comes (the
    JSON rules then say why)."""
    path, columns = Path(source.path), dict(source.columns)
    if is_parquet(path):
        rows: Iterator[object] = parquet_rows(path, progress)
    elif path.suffix.lower() == ".csv":
        rows = _csv_dicts(path)
    else:
        rows = (_json_value(raw) for raw in read_raw(path))
    for row in rows:
        yield event_row(row, columns, source.ts_format) if isinstance(row, dict) else row


def _json_value(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw   # not an object: decode() gives its reason (bad_json, not_utf8, ...)


def _csv_dicts(path: Path) -> Iterator[object]:
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        try:
            for row in csv.DictReader(f):
                yield {k: v for k, v in row.items() if k is not None}
        except (UnicodeDecodeError, csv.Error) as exc:
            yield Rejection("not_utf8" if isinstance(exc, UnicodeDecodeError) else "bad_csv", str(exc)[:200])


def decode_log(source: "str | Path | LogInput", config: StreamConfig, progress: bool = False) -> Iterator[Decoded]:
    source = as_input(source)
    path = Path(source.path)
    if not path.is_file():
        raise FileNotFoundError(f"event log {path} does not exist")
    if source.mapped:
        for row in _mapped_rows(source, progress):
            if isinstance(row, Rejection):
                yield row
            elif isinstance(row, bytes):
                yield decode(row, config)
            else:
                yield validate_record(row, config)
    elif path.suffix.lower() == ".csv":
        yield from _csv_rows(path, config)
    else:
        for raw in read_raw(path):
            yield decode(raw, config)


def collect(decoded, config: StreamConfig) -> LoadedEvents:
    out = LoadedEvents([], config.scenes, config.actions)
    for d in decoded:
        if isinstance(d, Event):
            out.events.append(d)
        else:
            out.invalid[d.reason] += 1
    return out


def synthetic_lines(spec: Optional["SyntheticSpec"] = None, clean: bool = False) -> list[bytes]:
    """Exactly the lines `scenestream generate` writes for this spec (default: `generate`'s defaults)."""
    from ..datasets.synthetic import SyntheticSpec, generate, log_lines
    spec = spec or SyntheticSpec()
    events, _ = generate(spec)
    return log_lines(events, 0.0 if clean else spec.malformed_fraction, spec.seed)


class SourceError(ValueError):
    """--dataset / --input given wrongly (both, neither, or a data set a command cannot take)."""


def check_source(dataset: Optional[str], input_path: Optional[str | Path]) -> None:
    """The one rule for where events come from: exactly one of a named data set or an event log."""
    if (dataset is None) == (input_path is None):
        raise SourceError("give exactly one of --dataset or --input")
    if dataset is not None and dataset not in DATASETS:
        raise SourceError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def load_events(dataset: Optional[str] = None, input_path: "Optional[str | Path | LogInput]" = None,
                config: Optional[StreamConfig] = None, scenes_mode: str = "genre",
                spec: Optional["SyntheticSpec"] = None) -> LoadedEvents:
    """One place that turns --dataset / --input into events. `config` fixes scenes and actions for logs;
    data sets bring their own scenes. Logs keep their line order (arrival order); data sets come in time order."""
    check_source(dataset, input_path)
    if input_path is not None:
        config = config or StreamConfig()
        return collect(decode_log(input_path, config, progress=True), config)
    if dataset == "synthetic":
        from ..datasets.synthetic import SyntheticSpec
        spec = spec or SyntheticSpec()
        config = StreamConfig(scenes=spec.scenes)
        return collect((decode(line, config) for line in synthetic_lines(spec)), config)
    if dataset in ("ml-1m", "ml-1m-5core", "ml-100k"):
        from ..datasets.movielens import dataset_scenes, load_movielens
        # The files are sorted by user, not an arrival log: give them in the order they happened (ties: file
        # order, which event_id encodes), so replay and produce stream them as a live system would see them.
        events = sorted(load_movielens(dataset, scenes=scenes_mode), key=lambda e: e.order_key)
        return LoadedEvents(events, dataset_scenes(scenes_mode))
    raise AssertionError(dataset)  # check_source admits only DATASETS


def raw_lines(dataset: Optional[str] = None, input_path: "Optional[str | Path | LogInput]" = None,
              scenes_mode: str = "genre") -> Iterable[bytes]:
    """The payloads a source holds, as they are (bad ones included), for `produce`: an event log's lines, read as
    they are sent (a log may outgrow memory), the synthetic log's lines, or a MovieLens data set's events in time
    order as canonical JSON."""
    check_source(dataset, input_path)
    if input_path is not None:
        source = as_input(input_path)
        if not Path(source.path).is_file():
            raise FileNotFoundError(f"event log {source.path} does not exist")
        if source.mapped:   # rows as JSON events, bad ones too: the worker judges them as it judges any payload
            return _started(row if isinstance(row, bytes) else
                            orjson.dumps(row.detail if isinstance(row, Rejection) else row)
                            for row in _mapped_rows(source, progress=False))
        return _started(read_raw(source.path))
    if dataset == "synthetic":
        return synthetic_lines()
    return [encode(e) for e in load_events(dataset, scenes_mode=scenes_mode).events]


def _started(lines: Iterator[bytes]) -> Iterator[bytes]:
    """`lines` with the first one read now: a file that cannot be read or mapped says so before anything is sent."""
    first = next(lines, None)
    return iter(()) if first is None else chain([first], lines)


def time_cutoff(events: Sequence[Event], fraction: float) -> int:
    """The ts that splits events so that about `fraction` of them are strictly older: events with
    ts < cutoff are 'before'. Shared by `train --cutoff` and `replay --eval-cutoff`."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError("a cutoff fraction must be in (0, 1]")
    ts = sorted(e.ts for e in events)
    if not ts:
        return 0
    if fraction >= 1.0:
        return ts[-1] + 1
    return ts[min(len(ts) - 1, int(fraction * len(ts)))]


def write_jsonl(path: str | Path, lines) -> None:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")


