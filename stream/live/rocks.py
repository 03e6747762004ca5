"""A partition's state on local disk (RocksDB, `--state rocksdb`), so that a worker holds more users than fit in RAM
and a restart does not replay the whole changelog.

The changelog topic stays the source of truth; the disk is a cache of its join. It stores, in one RocksDB per
changelog partition, each user's state (the changelog's JSON, with names), the partition's item counts, the
highest source offset whose state it holds ("applied"), and `covered`: every changelog record at an offset <=
covered is joined into it. Recovery joins the disk with the changelog records after `covered` only (the tail),
which gives the same state as joining the whole changelog, because states are a lattice: the disk may hold more
than the changelog up to `covered` (this worker's own later writes, which are in the changelog too), never less.

`covered` advances only over offsets this worker wrote itself, as the broker acknowledged them, with no gap: a
record another writer put in between (a previous owner still finishing) is read at the next recovery. Values are
raw bytes (`raw_mode`): nothing on disk is ever unpickled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from ..core.popularity import Popularity

# Users are keyed by their id; the rest by keys that start with a control character, which no valid id has
COVERED_KEY, APPLIED_KEY, COUNT_PREFIX, SEPARATOR = b"\x00covered", b"\x00applied", b"\x00count\x1f", b"\x1f"


# RocksDB's own memory, bounded for every partition a worker holds together: one block cache for all, and small
# write buffers (the defaults, 64 MB x 2 per database, would cost a worker with 8 partitions up to 1 GB)
BLOCK_CACHE = Cache(64 << 20)
WRITE_BUFFER_BYTES = 4 << 20


def _options() -> Options:
    options = Options(raw_mode=True)
    table = BlockBasedOptions()
    table.set_block_cache(BLOCK_CACHE)
    table.set_cache_index_and_filter_blocks(True)
    options.set_block_based_table_factory(table)
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(2)
    return options


class DiskPartition:
    def __init__(self, root: str | Path, topic: str, partition: int):
        self.path = Path(root) / f"{topic}-{partition}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(self.path), options=_options())
        self.covered = int(self.db.get(COVERED_KEY) or b"-1")
        self.applied = int(self.db.get(APPLIED_KEY) or b"-1")

    def get(self, user: str) -> Optional[bytes]:
        """The user's state as the changelog writes one (stream/live/state.py, `encode_state`)."""
        return self.db.get(user.encode())

    def has(self, user: str) -> bool:
        return user.encode() in self.db

    def write(self, states: Mapping[str, bytes], deltas: Mapping[str, Mapping[str, int]],
              covered: Optional[int] = None, applied: Optional[int] = None) -> None:
        """Users' whole new states (encoded), the change in each (scene, item) count, and the markers, in one
        atomic batch."""
        batch = WriteBatch(raw_mode=True)
        for user, state in states.items():
            batch.put(user.encode(), state)
        for scene, items in deltas.items():
            for item, d in items.items():
                key = COUNT_PREFIX + scene.encode() + SEPARATOR + item.encode()
                left = int(self.db.get(key) or b"0") + d
                if left:
                    batch.put(key, str(left).encode())
                else:
                    batch.delete(key)
        if covered is not None and covered > self.covered:
            self.covered = covered
            batch.put(COVERED_KEY, str(covered).encode())
        if applied is not None and applied > self.applied:
            self.applied = applied
            batch.put(APPLIED_KEY, str(applied).encode())
        self.db.write(batch)

    def popularity(self) -> Popularity:
        """The item counts of every window on disk (kept with the windows, so no window is read for them)."""
        pop = Popularity()
        for key, value in self.db.items(from_key=COUNT_PREFIX):
            if not key.startswith(COUNT_PREFIX):
                break
            scene, item = key[len(COUNT_PREFIX):].split(SEPARATOR, 1)
            pop.counts[scene.decode()][item.decode()] = int(value)
        return pop

    def close(self) -> None:
        self.db.close()
