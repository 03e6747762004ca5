"""Event logs and named data sets -> decoded events, with every rejected line counted by reason.

JSONL lines are decoded exactly like Kafka message values (`events.decode`); CSV rows (header: the event fields)
go through the same validation after `ts` is read as an integer.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from ..core.config import DEFAULT_ACTIONS, StreamConfig
from ..core.events import Decoded, Event, Rejection, decode, encode, validate_record

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


def read_raw(path: str | Path) -> Iterator[bytes]:
    """JSONL: one raw payload per non-empty line (the newline stripped)."""
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line


def _csv_rows(path: Path, config: StreamConfig) -> Iterator[Decoded]:
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        try:
            reader = csv.DictReader(f)
            for row in reader:
                row = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                ts = row.get("ts")
                if isinstance(ts, str):
                    try:
                        row["ts"] = int(ts)
                    except ValueError:
                        yield Rejection("wrong_type", f"ts {ts[:32]!r} is not an integer")
                        continue
                yield validate_record(row, config)
        except (UnicodeDecodeError, csv.Error) as exc:
            yield Rejection("not_utf8" if isinstance(exc, UnicodeDecodeError) else "bad_csv", str(exc)[:200])


def decode_log(path: str | Path, config: StreamConfig) -> Iterator[Decoded]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"event log {path} does not exist")
    if path.suffix.lower() == ".csv":
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


def load_events(dataset: Optional[str] = None, input_path: Optional[str | Path] = None,
                config: Optional[StreamConfig] = None, scenes_mode: str = "genre",
                spec: Optional["SyntheticSpec"] = None) -> LoadedEvents:
    """One place that turns --dataset / --input into events. `config` fixes scenes and actions for logs;
    data sets bring their own scenes. Logs keep their line order (arrival order); data sets come in time order."""
    check_source(dataset, input_path)
    if input_path is not None:
        config = config or StreamConfig()
        return collect(decode_log(input_path, config), config)
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


def raw_lines(dataset: Optional[str] = None, input_path: Optional[str | Path] = None,
              scenes_mode: str = "genre") -> list[bytes]:
    """The payloads a source holds, as they are (bad ones included), for `produce`: an event log's lines, the
    synthetic log's lines, or a MovieLens data set's events in time order as canonical JSON."""
    check_source(dataset, input_path)
    if input_path is not None:
        if not Path(input_path).is_file():
            raise FileNotFoundError(f"event log {input_path} does not exist")
        return list(read_raw(input_path))
    if dataset == "synthetic":
        return synthetic_lines()
    return [encode(e) for e in load_events(dataset, scenes_mode=scenes_mode).events]


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


