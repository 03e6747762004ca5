"""The encoder for windows held as slots: the cached rows of every window in slot-indexed tensors, a micro-batch's
windows encoded as one forward of their new positions against their cached rows (read in place by the attention's C
kernel, model/ring_attention.py; gathered where torch does it) and one scatter, with no object per window or per
user.

The stream side (stream/core/slots.py) hands over, per stack (the scene windows; the users' merged timelines),
windows as rows of fixed-width arrays, with a cache key per window (its slot), the key's version (new when the slot
changed hands or was written other than by appending), and how many rows were appended since it was last encoded
(-1: it changed otherwise).

Why reusing cached rows is exact. Attention is local (model.py): layer l's input at a position (the normed row its
keys and values are made from) depends on the events at most l * span back. So an entry holds, per layer, the inputs
at the window's last `span` positions, and the window's output vector. When k events are appended, only the newest
position's output is read and only the newest `span` rows of each layer are kept, and both depend on the new
window's last receptive-field (cone) events alone: so if the events before the new positions are the ones the entry
was encoded from, in place (the same key and version, the same last row, nothing changed but appends since), the new
positions are encoded against the cached rows and give what a full encode of the new window gives (within float
rounding), even when a full window dropped its k oldest events (rows computed from those are never read again).
Anything else is a miss: the window is encoded whole and its entry replaced. Windows shorter than the receptive
field (a checkpoint served with a small --window) cut off what the model would see, so there an entry is extended
only while the window has dropped no event.

The cache is derived state: a byte budget of preallocated entries (`Pool`), least recently used first out, lost on
restart, never a source of truth. Outside the budget each window also keeps its last output (d floats), so a touched
user's windows that did not change read theirs back even when their entries are gone: with more users than the cache
holds, an event costs its own window's encode and the timeline's, not every window of its user.
tests/test_slot_encoder.py holds every output to a full encode within 1e-5.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import ModelConfig, receptive_field
from .model import Past, gap_bucket
from .ring_attention import Ring, ring_kernel

MAX_POSITIONS = 8192   # positions (rows x width) one forward takes at most: SlotEncoder.max_positions

# Windows of one stack, as the encoder reads them: any object with these arrays, row b of each being window b
# (stream/core/slots.py: Windows). Rows are right-aligned, window b's n[b] events in columns L-n[b] .. L-1, oldest
# first; item, action and scene are codes of the caller's codebook.
#     keys      [B] int64  cache key (a slot)
#     version   [B] int64  the key's version: another one means the cached rows are not this window's
#     appended  [B] int64  rows appended since the window was last encoded, -1 when not known
#     n         [B] int64
#     ts, hash, item, action, scene   [B, L]   (hash: of the event id; with ts it names the row's event)
Windows = object


class Pool:
    """Cache entries of one stack in preallocated tensors: per entry every layer's inputs at its window's newest
    `span` positions (a ring), its output vector, and what identifies them (key, version, last row encoded, rows
    then). A key's entry is `entry_of[key]`; the least recently used go first."""

    def __init__(self, cfg: ModelConfig, layers: int, window: int, capacity: int, device: torch.device):
        self.span, self.window, self.layers = cfg.span, window, layers
        self.cone = receptive_field(layers, cfg.span)
        self.extendable = window >= self.cone
        self.capacity = capacity
        # layer, entry, ring row, d: a layer's rows of a batch of entries are one index_select of whole entries into
        # a contiguous [B, span, d], what attention reads (half the bytes of keys and values)
        self.rows = torch.zeros(layers, capacity, cfg.span, cfg.d_model, device=device)
        self.vec = torch.zeros(capacity, cfg.d_model, device=device)
        self.key = np.full(capacity, -1, np.int64)
        self.version = np.zeros(capacity, np.int64)
        self.last_ts = np.zeros(capacity, np.int64)
        self.last_hash = np.zeros(capacity, np.int64)
        self.rows_then = np.zeros(capacity, np.int64)   # the window's rows when last encoded
        self.ring = np.zeros(capacity, np.int64)        # valid rows in the ring
        self.head = np.zeros(capacity, np.int64)        # ring index the next row goes to
        self.stamp = np.zeros(capacity, np.int64)       # when last used
        self.clock = 0
        self.entry_of = np.full(0, -1, np.int64)        # key -> entry
        self.free = list(range(capacity - 1, -1, -1))
        self.stats = {"hits": 0, "extends": 0, "misses": 0, "evictions": 0, "unchanged": 0}
        # Per key, outside the budget: the output of its window when last encoded, and what identifies that window
        # (version, last row, rows). A window of a touched user that did not change since (a user's other scenes)
        # reads it back even when its entry has left the cache: a miss costs one window's encode, not all of them.
        self.out = torch.zeros(0, cfg.d_model, device=device)
        self.out_id = np.zeros((0, 4), np.int64)        # version, last ts, last hash, rows; version -1: none

    def __len__(self) -> int:
        return self.capacity - len(self.free)

    def entry_bytes(self) -> int:
        rows = self.layers * math.prod(self.rows.shape[-2:]) * self.rows.element_size()
        return rows + self.vec.shape[1] * self.vec.element_size() + 8 * 8

    def entries(self, keys: np.ndarray) -> np.ndarray:
        if len(keys) and int(keys.max()) >= len(self.entry_of):
            size = max(int(keys.max()) + 1, 2 * len(self.entry_of))
            self.entry_of = np.concatenate([self.entry_of, np.full(size - len(self.entry_of), -1, np.int64)])
        return self.entry_of[keys]

    def unchanged(self, w: Windows, b: np.ndarray) -> np.ndarray:
        """Which of windows b are, unchanged, the windows whose outputs `remember` kept last."""
        L, keys = w.ts.shape[1], w.keys[b]
        known = keys < len(self.out_id)
        if not known.any():
            return known
        seen = self.out_id[np.where(known, keys, 0)]
        return known & (w.appended[b] == 0) & (seen[:, 0] == w.version[b]) & (seen[:, 1] == w.ts[b, L - 1]) & \
            (seen[:, 2] == w.hash[b, L - 1]) & (seen[:, 3] == w.n[b])

    def remember(self, w: Windows, out: torch.Tensor, rows: np.ndarray) -> None:
        """Windows `rows`' outputs, just encoded (or read), for `unchanged`."""
        L, keys = w.ts.shape[1], w.keys[rows]
        if not len(keys):
            return
        if int(keys.max()) >= len(self.out_id):
            size = max(int(keys.max()) + 1, 2 * len(self.out_id))
            self.out_id = np.concatenate([self.out_id, np.full((size - len(self.out_id), 4), -1, np.int64)])
            self.out = torch.cat([self.out, self.out.new_zeros(size - len(self.out), self.out.shape[1])])
        self.out.index_copy_(0, _tensor(keys, self.out.device), out.index_select(0, _tensor(rows, out.device)).to(
            self.out.dtype))
        self.out_id[keys] = np.stack([w.version[rows], w.ts[rows, L - 1], w.hash[rows, L - 1], w.n[rows]], axis=1)

    def reserve(self, keys: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """An empty entry for each key (encoded whole now: its own, emptied, or one taken from the least recently
        used), never one in `keep` (this micro-batch's); -1 for a key left uncached when every entry is in use."""
        out = self.entries(keys).copy()
        self.ring[out[out >= 0]], self.head[out[out >= 0]] = 0, 0
        need = np.flatnonzero(out < 0)
        if not len(need):
            return out
        taken = [self.free.pop() for _ in range(min(len(need), len(self.free)))]
        short = len(need) - len(taken)
        if short > 0:
            stamps = self.stamp.copy()
            stamps[keep[keep >= 0]] = np.iinfo(np.int64).max
            stamps[np.asarray(taken, np.int64)] = np.iinfo(np.int64).max
            stamps[out[out >= 0]] = np.iinfo(np.int64).max
            victims = np.argpartition(stamps, short - 1)[:short] if short < len(stamps) else np.arange(len(stamps))
            victims = victims[stamps[victims] < np.iinfo(np.int64).max]
            self.stats["evictions"] += len(victims)
            self.entry_of[self.key[victims]] = -1
            taken += victims.tolist()
        got = np.asarray(taken, np.int64)
        out[need[:len(got)]] = got
        self.key[got] = keys[need[:len(got)]]
        self.entry_of[keys[need[:len(got)]]] = got
        self.ring[got], self.head[got] = 0, 0
        return out

    def past(self, entries: np.ndarray, new_pos: torch.Tensor) -> list[Past]:
        """Each layer's cached rows of the entries, in ring order, with their positions (newest at -1)."""
        dev = self.rows.device
        e = torch.from_numpy(np.maximum(entries, 0)).to(dev)                  # -1 (none): no valid row
        head = torch.from_numpy(self.head[entries]).to(dev)[:, None]
        count = torch.from_numpy(np.where(entries >= 0, self.ring[entries], 0)).to(dev)[:, None]
        pos = (torch.arange(self.span, device=dev)[None] - head) % self.span - self.span
        valid = pos >= -count
        cap, shape = self.capacity, (len(entries), *self.rows.shape[-2:])
        return [Past(torch.index_select(self.rows[layer].view(cap, -1), 0, e).view(shape), valid, pos, new_pos)
                for layer in range(self.layers)]

    def rings(self, entries: np.ndarray, fresh: np.ndarray) -> list[Past]:
        """Each layer's cached rows of the entries (-1: none) where they lie, for windows whose `fresh` newest
        positions are new (the C kernel reads them in place: model/ring_attention.py)."""
        if self.capacity:
            at = np.maximum(entries, 0)
            head, count = self.head[at], np.where(entries >= 0, self.ring[at], 0)
        else:   # no cache: nothing held
            entries, head = np.full(len(entries), -1, np.int64), np.zeros(len(entries), np.int64)
            count = head
        return [Past(None, None, None, None, Ring(self.rows[layer], entries, head, count, fresh))
                for layer in range(self.layers)]

    def nothing(self, B: int, new_pos: torch.Tensor) -> list[Past]:
        """No cached rows, for windows encoded whole."""
        dev = self.rows.device
        empty = Past(torch.zeros(B, 0, self.rows.shape[-1], device=dev),
                     torch.zeros(B, 0, dtype=torch.bool, device=dev), torch.zeros(B, 0, dtype=torch.long, device=dev),
                     new_pos)
        return [empty] * self.layers

    def store(self, entries: np.ndarray, w: Windows, b: np.ndarray, presents, counts: np.ndarray,
              vec: torch.Tensor) -> None:
        """Windows b were just encoded, their counts[i] newest positions the right end of `presents` (each layer's
        inputs [B, T, C]): their rows go into the entries' rings, with what identifies them."""
        live = np.flatnonzero(entries >= 0)
        if not len(live):
            return
        span, T = self.span, presents[0].shape[1]
        ent, ks = entries[live], counts[live]
        w_rows = np.minimum(ks, span)                                  # rows written per entry
        within = np.arange(int(w_rows.sum())) - np.repeat(np.cumsum(w_rows) - w_rows, w_rows)
        b_idx = np.repeat(live, w_rows)
        t_idx = T - np.repeat(w_rows, w_rows) + within
        ring_idx = (np.repeat(self.head[ent] + ks - w_rows, w_rows) + within) % span
        dev = self.rows.device
        dest = _tensor(np.repeat(ent, w_rows) * span + ring_idx, dev)   # as flat row numbers
        C = self.rows.shape[3]
        for layer, x in enumerate(presents):   # a layer above the first may hold the newest positions alone
            src = _tensor(b_idx * x.shape[1] + t_idx - (T - x.shape[1]), dev)
            self.rows[layer].view(-1, C).index_copy_(0, dest, x.reshape(-1, C).index_select(0, src).to(self.rows.dtype))
        self.vec.index_copy_(0, _tensor(ent, dev), vec.index_select(0, _tensor(live, dev)).to(self.vec.dtype))
        self.head[ent] = (self.head[ent] + ks) % span
        self.ring[ent] = np.minimum(span, self.ring[ent] + ks)
        rows = b[live]
        L = w.ts.shape[1]
        self.last_ts[ent], self.last_hash[ent] = w.ts[rows, L - 1], w.hash[rows, L - 1]
        self.version[ent], self.rows_then[ent] = w.version[rows], w.n[rows]


class SlotEncoder:
    """Outputs of windows held as slots, through `encoder`'s model (model/infer.py's InterestEncoder: its
    checkpoint, its codes for the caller's codebook and its fusion)."""

    def __init__(self, encoder, cache_mb: float, batch_size: int = 2048):
        self.encoder, self.model, self.device = encoder, encoder.model, encoder.device
        cfg, window = self.model.cfg, encoder.window
        budget = int(cache_mb * 2**20)
        probe = [Pool(cfg, cfg.layers(scene), window, 1, self.device) for scene in (True, False)]
        if cfg.own_scene_stack:   # per user up to S scene windows and one timeline: the budget split so
            share = probe[1].entry_bytes() / (cfg.n_scenes * probe[0].entry_bytes() + probe[1].entry_bytes())
        else:
            share = 1 / (cfg.n_scenes + 1)
        self.scene_pool = Pool(cfg, cfg.layers(True), window, max(0, int(budget * (1 - share)) //
                                                                   probe[0].entry_bytes()), self.device)
        self.timeline_pool = Pool(cfg, cfg.layers(False), window, max(0, int(budget * share) //
                                                                     probe[1].entry_bytes()), self.device)
        self.batch_size = batch_size
        # positions (rows x width) per forward: windows encoded whole (cache misses) are L wide, and 2,048 of them
        # made temporaries of ~100 MB whose sizes changed from batch to batch; glibc serves those from its heap once
        # its mmap threshold has risen, and the heap's holes grew the RSS ~10 MB a minute (bench/soak.py, default
        # cache, 100,000 users). Extensions (a few positions each) are not cut by it.
        self.max_positions = MAX_POSITIONS
        self.ring_kernel = ring_kernel(self.device, next(self.model.parameters()).dtype, cfg.n_heads, cfg.span)

    @property
    def pools(self) -> list[Pool]:
        return [self.scene_pool, self.timeline_pool]

    @property
    def width(self) -> int:
        return self.model.cfg.d_model

    @property
    def shared_stack(self) -> bool:
        """Scene windows go through the timeline's blocks: a user with one scene has one window, both outputs."""
        return not self.model.cfg.own_scene_stack

    def vectors(self, w: Windows, book, scene: bool, complete=None) -> np.ndarray:
        """`outputs`, as a float32 array."""
        return self.outputs(w, book, scene, complete).float().cpu().numpy()

    @torch.inference_mode()
    def outputs(self, w: Windows, book, scene: bool, complete=None) -> torch.Tensor:
        """[B, d] last-position outputs of the windows: cached ones read, appended ones extended against their
        cached rows, the rest encoded whole (and cached). With `complete`, `w` may hold only each window's appended
        rows and the row before them (what an extension reads); complete(rows) gives those windows whole, for the
        rows that must be encoded whole."""
        pool = self.scene_pool if scene else self.timeline_pool
        B, L = len(w), w.ts.shape[1]
        out = torch.zeros(B, self.model.cfg.d_model, device=self.device)
        if not B:
            return out
        pool.clock += 1
        # windows unchanged since last encoded (a touched user's other scenes) read their outputs as then, and are
        # asked nothing else: their entries (if any) only stay fresh
        quiet = np.flatnonzero(w.appended == 0)
        kept_out = quiet[pool.unchanged(w, quiet)]
        if pool.capacity and len(kept_out):
            e = pool.entries(w.keys[kept_out])
            pool.stamp[e[e >= 0]] = pool.clock
        todo = np.ones(B, bool)
        todo[kept_out] = False
        rows = np.flatnonzero(todo)
        e = pool.entries(w.keys[rows]) if pool.capacity else np.full(len(rows), -1, np.int64)
        k, n = w.appended[rows], w.n[rows]
        at = np.maximum(e, 0)
        before = np.clip(L - 1 - k, 0, L - 1)   # the row before the appended ones
        ok = (e >= 0) & (k >= 0) & (k < n)
        if pool.capacity:
            ok &= pool.version[at] == w.version[rows]
            ok &= (pool.last_ts[at] == w.ts[rows, before]) & (pool.last_hash[at] == w.hash[rows, before])
            ok &= pool.rows_then[at] + k >= n         # every row since encoded is one of the appended ones
            if not pool.extendable:                   # shorter than the receptive field: only if none dropped
                ok &= pool.rows_then[at] + k == n
        # a window all of whose rows are new (a user's first event in a scene) is the extension of an emptied entry:
        # the same positions as encoded whole, in the same forward as the extended ones, not one of its own
        new = ~ok & (k >= n) & (n < pool.cone) & (pool.capacity > 0)
        hit_at, grow_at, new_at = np.flatnonzero(ok & (k == 0)), np.flatnonzero(ok & (k > 0)), np.flatnonzero(new)
        hit, grow, whole = rows[hit_at], rows[grow_at], rows[~ok & ~new]
        pool.stats["hits"] += len(hit)
        pool.stats["extends"] += len(grow)
        pool.stats["misses"] += len(whole) + len(new_at)
        pool.stats["unchanged"] += len(kept_out)
        if len(hit):
            out.index_copy_(0, _tensor(hit, self.device), pool.vec.index_select(0, _tensor(e[hit_at], self.device)))
        if len(kept_out):
            out.index_copy_(0, _tensor(kept_out, self.device),
                            pool.out.index_select(0, _tensor(w.keys[kept_out], self.device)).to(out.dtype))
        kept = e[np.r_[hit_at, grow_at]].astype(np.int64)
        if len(new_at):
            kept = np.r_[kept, pool.reserve(w.keys[rows[new_at]], kept)]
        if len(grow) or len(new_at):
            self._encode(pool, w, rows[np.r_[grow_at, new_at]], kept[len(hit_at):], np.r_[k[grow_at], n[new_at]],
                         book, scene, out)
        kept = kept[kept >= 0]
        pool.stamp[kept] = pool.clock
        if len(whole):
            fresh = pool.reserve(w.keys[whole], kept) if pool.capacity else np.full(len(whole), -1, np.int64)
            full, of = (complete(whole), np.arange(len(whole))) if complete is not None else (w, whole)
            L = full.ts.shape[1]   # `w` may hold the windows' last columns alone
            # only the newest `cone` events reach the last output and the rows an entry keeps, the oldest of them
            # through its time (the column before the encoded ones): a one-layer scene stack's miss encodes 25
            # positions of a 50-event window, not 50
            self._encode(pool, full, of, fresh, np.minimum(full.n[of], min(L, pool.cone - 1)), book, scene, out,
                         past=False, at=whole)
            pool.stamp[fresh[fresh >= 0]] = pool.clock
        pool.remember(w, out, rows)
        return out

    def _encode(self, pool: Pool, w: Windows, b: np.ndarray, entries: np.ndarray, new: np.ndarray, book,
                scene: bool, out: torch.Tensor, past: bool = True, at: np.ndarray | None = None) -> None:
        """Windows b's newest `new` rows through the stack (against their entries' rows when `past`), in runs of
        similar widths; outputs into rows `at` (default b) of `out`, rows into the entries (-1: not cached)."""
        at = b if at is None else at
        items, actions, scenes = self.encoder.codes(book)
        L, dev, gap_buckets = w.ts.shape[1], self.device, self.model.cfg.gap_buckets
        order = np.argsort(new, kind="stable")
        for run in _runs(order, new, self.batch_size, self.max_positions):
            idx, width = b[run], int(new[run].max())
            count = new[run]
            cols = np.arange(L - width, L)
            valid = cols[None, :] >= (L - count)[:, None]
            # the columns read, not whole rows: an event each (live traffic) reads 2 of L
            ts_from = w.ts[idx, L - width - 1:] if width < L else \
                np.concatenate([np.zeros((len(idx), 1), np.int64), w.ts[idx]], axis=1)
            ts, prev = ts_from[:, 1:], ts_from[:, :-1]
            # a row has a predecessor if the window holds one before it: not the window's first row
            has_prev = cols[None, :] > (L - w.n[idx])[:, None]
            gaps = torch.from_numpy(np.where(has_prev & valid, gap_bucket(ts - prev, gap_buckets), 0))
            inputs = [torch.from_numpy(np.where(valid, items(w.item[idx, L - width:]), 0)),
                      torch.from_numpy(np.where(valid, actions(w.action[idx, L - width:]), 0)),
                      torch.from_numpy(np.where(valid, scenes(w.scene[idx, L - width:]), 0)),
                      gaps, torch.from_numpy(valid)]
            inputs = [t.to(dev) for t in inputs]
            # a window encoded whole takes the extension's path too, from no past: its folded maps form no key or
            # value, and a one-query stack (the scene windows') maps one row, not every row three times
            if self.ring_kernel:   # cached rows read where they lie
                cache_past = pool.rings(entries[run] if past else np.full(len(idx), -1, np.int64), count)
            else:
                new_pos = torch.arange(width, device=dev)[None] - torch.from_numpy(width - count).to(dev)[:, None]
                cache_past = pool.past(entries[run], new_pos) if past else pool.nothing(len(idx), new_pos)
            h, presents = self.model.encoder.extend(*inputs, cache_past, last_only=True, scene=scene)
            out.index_copy_(0, _tensor(at[run], dev), h)
            pool.store(entries[run], w, idx, presents, count, h)

    @torch.inference_mode()
    def fuse(self, h: np.ndarray, has: np.ndarray, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        as_t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        H, a = self.model.fusion(as_t(h), as_t(has), as_t(recent))
        return H.float().cpu().numpy(), a.float().cpu().numpy()


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 index array as a tensor on `device`."""
    return torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(device)


def _runs(order: np.ndarray, sizes: np.ndarray, batch_size: int, max_positions: int = MAX_POSITIONS,
          min_rows: int = 32) -> list[np.ndarray]:
    """`order` (ascending by size) cut into runs encoded together: at most batch_size rows, and a new run where the
    size passes 1.5x the run's smallest once it has min_rows (few rows pad far; small runs share a forward). Sizes
    mostly repeat (one new event each, a full window), so the cuts are found per distinct size. Each run is then
    cut again so that rows x its widest size stays within max_positions (see SlotEncoder.max_positions)."""
    cut = []
    for run in _size_runs(order, sizes, batch_size, min_rows):
        step = max(1, max_positions // max(1, int(sizes[run[-1]])))   # ascending: the last is the widest
        cut += [run[i:i + step] for i in range(0, len(run), step)]
    return cut


def _size_runs(order: np.ndarray, sizes: np.ndarray, batch_size: int, min_rows: int) -> list[np.ndarray]:
    sizes_sorted = sizes[order]
    values, starts = np.unique(sizes_sorted, return_index=True)
    runs, start = [], 0
    bounds = [*starts.tolist()[1:], len(order)]
    for value, end in zip(values.tolist(), bounds):   # a run may end at a size boundary, or be cut to batch_size
        if end - start >= min_rows and end < len(order) and sizes_sorted[end] > 1.5 * sizes_sorted[start]:
            runs += [order[i:min(i + batch_size, end)] for i in range(start, end, batch_size)]
            start = end
    runs += [order[i:min(i + batch_size, len(order))] for i in range(start, len(order), batch_size)]
    return [r for r in runs if len(r)]
