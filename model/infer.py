"""Windows in, interest vectors out: the model over a checkpoint, encoding windows whole.

`InterestEncoder.interests` is the offline encode from scratch that the exactness contract is stated against: a
pure function of the windows. The live worker and replay encode through slot_encoder.py instead, which reuses each
window's cached positions and gives the same vectors within 1e-5; `cache_mb` is the budget it takes over this
encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .checkpoint import Checkpoint
from .model import FIRST_ITEM, OOV
from .config import ENCODER_CACHE_MB
from .vocab import Codes, concat_rows, tensorize

def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA when present, else CPU. Asking for cuda without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


@dataclass
class Interests:
    """Vectors for a list of users, row-aligned with `users`. S = number of configured scenes."""
    users: list[str]
    h: np.ndarray        # [U, S, d] per-scene interest (zeros where no history)
    has: np.ndarray      # [U, S] bool
    recent: np.ndarray   # [U, d] the merged window's last output: interest as of the newest event
    fused: np.ndarray    # [U, S + 1, d] H_j per scene, then the global vector
    weights: np.ndarray  # [U, S + 1, S] a_ij (rows as fused)


# A window, as the encoder reads it: any object with `table()` (a structured array, one row per event ascending by
# (ts, event_id), with fields ts, item, action and scene: codes whose names are in the object's `codebook`),
# `ids(start)` (the event ids from the start-th on) and `last_key()` ((ts, event_id) of its newest event):
# scenestream.stream.core.window.Window. Inside the encoder a window is its table; equal row bytes are the same
# event (rows carry a hash of the event id).


def merged_window(state: Mapping[str, object], length: int) -> np.ndarray:
    """The newest `length` events over all of a user's scene windows, ascending by (ts, event_id). Every one of the
    newest `length` events of the user is among the newest `length` of its own scene, so this is the window of all
    scenes' events that a single window of length L would hold: derived from the state, never stored."""
    windows = [w for w in state.values() if w]
    if len(windows) == 1:
        return windows[0].table()[-length:]
    rows = concat_rows([w.table()[-length:] for w in windows])
    ts = rows["ts"]
    order = np.argsort(ts, kind="stable")
    if np.any(np.diff(ts[order]) == 0):   # ties in time, by event id
        ids = [i for w in windows for i in w.ids(max(0, len(w) - length))]
        order = sorted(range(len(rows)), key=lambda k: (int(ts[k]), ids[k]))
    return rows[order][-length:]


class InterestEncoder:
    def __init__(self, ckpt: Checkpoint, device: str | torch.device = "cpu", batch_size: int = 2048,
                 cache_mb: float = ENCODER_CACHE_MB):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.model = ckpt.model.to(self.device).eval()
        self.scenes = ckpt.scenes
        self.scene_index = {s: i for i, s in enumerate(ckpt.scenes)}
        self.action_index = {a: i for i, a in enumerate(ckpt.actions)}
        self.batch_size = batch_size
        self.cache_mb = cache_mb   # the streaming encoder's budget over this one (slot_encoder.py)
        self._codes: dict = {}   # codebook -> (items, actions, scenes) codes -> this model's indices
        self._book = None        # the codebook of the windows being encoded

    def codes(self, book) -> tuple[Codes, Codes, Codes]:
        got = self._codes.get(book)
        if got is None:
            got = self._codes[book] = (Codes(book.items.names, self.ckpt.vocab._index, OOV),
                                       Codes(book.actions.names, self.action_index, 0),
                                       Codes(book.scenes.names, self.scene_index, 0))
        return got

    @property
    def version(self) -> str:
        return self.ckpt.version

    @property
    def window(self) -> int:
        return self.ckpt.window

    @torch.inference_mode()
    def encode_windows(self, windows: Sequence, scene: bool = False) -> np.ndarray:
        """[N] windows -> [N, d] last-position outputs of a full encode (no cache); scene: per-scene windows (their
        own stack, if the model has one), else merged timelines."""
        if windows:
            self._book = windows[0].codebook
        return self._encode([w.table() for w in windows], scene=scene).float().cpu().numpy()

    def _encode(self, windows: Sequence[np.ndarray], scene: bool = False) -> torch.Tensor:
        """Outputs [N, d] of whole windows (tables), sorted by length and cut into chunks (`_chunks`) that pad
        little: results do not depend on the chunking. scene: per-scene windows (their stack), else merged ones."""
        cfg = self.model.cfg
        n = len(windows)
        sizes = [len(w) for w in windows]
        out = torch.zeros(n, cfg.d_model, device=self.device)
        order = sorted(range(n), key=sizes.__getitem__)
        for idx in _chunks(order, sizes, self.batch_size):
            width = min(sizes[idx[-1]], self.window)
            batch = tensorize([windows[i] for i in idx], *self.codes(self._book), cfg.gap_buckets, width
                              ).to(self.device)
            h, _ = self.model.encoder.extend(*batch.inputs(), None, last_only=True, scene=scene)
            out[torch.tensor(idx, device=self.device)] = h
        return out

    @torch.inference_mode()
    def _sources(self, states: Sequence[Mapping[str, Sequence]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(h [U, S, d], has [U, S], recent [U, d]): each scene window's last output, and the merged window's
        (model.py, "Sources"). When scene windows share the timeline's blocks, a user seen in one scene has one
        window, whose output is both."""
        S, d = len(self.scenes), self.model.cfg.d_model
        shared = not self.model.cfg.own_scene_stack
        scene_tasks, merged_tasks = [], []   # (user row, scene index, window table); merged ones: (u, table)
        alias = []   # (user row, scene task) whose recent vector is that scene's h_s
        for u, state in enumerate(states):
            present = [(self.scene_index[scene], w) for scene, w in state.items() if w and scene in self.scene_index]
            for s, w in present:
                self._book = w.codebook
                scene_tasks.append((u, s, w.table()))
            if shared and len(present) == 1:
                alias.append((u, len(scene_tasks) - 1))
            elif present:
                merged_tasks.append((u, merged_window({self.scenes[s]: w for s, w in present}, self.window)))
        h = np.zeros((len(states), S, d), dtype=np.float32)
        has = np.zeros((len(states), S), dtype=bool)
        recent = np.zeros((len(states), d), dtype=np.float32)
        out = self._encode([t[2] for t in scene_tasks], scene=True).float().cpu().numpy()
        for n, (u, s, _) in enumerate(scene_tasks):
            h[u, s], has[u, s] = out[n], True
        for u, n in alias:
            recent[u] = out[n]
        if merged_tasks:
            rows = [t[0] for t in merged_tasks]
            recent[rows] = self._encode([t[1] for t in merged_tasks]).float().cpu().numpy()
        return h, has, recent

    @torch.inference_mode()
    def interests(self, states: Mapping[str, Mapping[str, Sequence]]) -> Interests:
        """user -> {scene: window} for users with at least one event -> their vectors."""
        users = list(states)
        h, has, recent = self._sources([states[u] for u in users])
        S = len(self.scenes)
        if not users:
            return Interests(users, h, has, recent, np.zeros((0, S + 1, h.shape[-1]), np.float32),
                             np.zeros((0, S + 1, S), np.float32))
        as_t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        H, a = self.model.fusion(as_t(h), as_t(has), as_t(recent))
        return Interests(users, h, has, recent, H.float().cpu().numpy(), a.float().cpu().numpy())

    def item_vectors(self) -> tuple[list[str], list[str], np.ndarray]:
        """The catalog the index serves: item ids, their scenes, and their embedding rows."""
        with torch.no_grad():
            E = self.model.item_vectors()[FIRST_ITEM:].float().cpu().numpy()
        return self.ckpt.vocab.item_ids, self.ckpt.vocab.item_scenes, np.ascontiguousarray(E)


def _chunks(order: Sequence[int], sizes: Sequence[int], batch_size: int, min_rows: int = 32) -> list[list[int]]:
    """`order` (ascending by size) cut into runs encoded together: at most batch_size rows, and a new run where the
    size passes 1.5x the run's smallest once it has min_rows, so that few rows pad far (a batch of 1-event appends
    with a few 4-event ones must not cost 4 positions a row) and small runs do not each pay a forward's fixed cost."""
    runs: list[list[int]] = []
    run: list[int] = []
    for i in order:
        if run and (len(run) >= batch_size or (len(run) >= min_rows and sizes[i] > 1.5 * sizes[run[0]])):
            runs.append(run)
            run = []
        run.append(i)
    if run:
        runs.append(run)
    return runs
