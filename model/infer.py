"""Windows in, interest vectors out: one batched forward for every window touched in a micro-batch.

The live worker and replay both call `InterestEncoder.interests`; the vectors are a pure function of the windows
(the exactness contract). Per-window vectors h_s are cached by window content, so a user touched in one scene does
not re-encode the others; the cache is derived, bounded and may be dropped at any time.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .checkpoint import Checkpoint
from .model import FIRST_ITEM
from .vocab import tensorize


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
    fused: np.ndarray    # [U, S + 1, d] H_j per scene, then the global vector
    weights: np.ndarray  # [U, S + 1, S] a_ij (rows as fused)


class InterestEncoder:
    def __init__(self, ckpt: Checkpoint, device: str | torch.device = "cpu", batch_size: int = 2048,
                 cache_size: int = 500_000):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.model = ckpt.model.to(self.device).eval()
        self.scenes = ckpt.scenes
        self.scene_index = {s: i for i, s in enumerate(ckpt.scenes)}
        self.action_index = {a: i for i, a in enumerate(ckpt.actions)}
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[tuple, np.ndarray]] = OrderedDict()

    @property
    def version(self) -> str:
        return self.ckpt.version

    @property
    def window(self) -> int:
        return self.ckpt.window

    @torch.inference_mode()
    def encode_windows(self, windows: Sequence[Sequence]) -> np.ndarray:
        """[N] windows -> [N, d] last-position outputs, in chunks of batch_size, width = configured window."""
        cfg = self.model.cfg
        out = np.zeros((len(windows), cfg.d_model), dtype=np.float32)
        # sort by length so each chunk pads little; results do not depend on the chunking
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            chunk = [windows[i] for i in idx]
            width = min(max(len(w) for w in chunk), self.window)
            batch = tensorize(chunk, self.ckpt.vocab, self.scene_index, self.action_index, cfg.gap_buckets,
                              width).to(self.device)
            h = self.model.encoder(*batch.inputs(), last_only=True)
            out[idx] = h.float().cpu().numpy()
        return out

    def _scene_vectors(self, states: Sequence[Mapping[str, Sequence]], users: Sequence[str]) -> np.ndarray:
        S, d = len(self.scenes), self.model.cfg.d_model
        h = np.zeros((len(users), S, d), dtype=np.float32)
        todo: list[tuple[int, int, tuple, Sequence]] = []
        for u, (user, state) in enumerate(zip(users, states)):
            for scene, window in state.items():
                s = self.scene_index.get(scene)
                if s is None or not window:
                    continue
                fp = tuple(window)  # the events themselves: equal content <=> same vector
                hit = self._cache.get((user, scene))
                if hit is not None and hit[0] == fp:
                    self._cache.move_to_end((user, scene))
                    h[u, s] = hit[1]
                else:
                    todo.append((u, s, fp, window))
        if todo:
            vectors = self.encode_windows([w for *_, w in todo])
            for (u, s, fp, _), vec in zip(todo, vectors):
                h[u, s] = vec
                if self.cache_size:
                    self._cache[(users[u], self.scenes[s])] = (fp, vec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return h

    @torch.inference_mode()
    def interests(self, states: Mapping[str, Mapping[str, Sequence]]) -> Interests:
        """user -> {scene: window} for users with at least one event -> their vectors."""
        users = list(states)
        h = self._scene_vectors([states[u] for u in users], users)
        has = np.zeros((len(users), len(self.scenes)), dtype=bool)
        for u, user in enumerate(users):
            for scene, window in states[user].items():
                if window and scene in self.scene_index:
                    has[u, self.scene_index[scene]] = True
        if not users:
            d = self.model.cfg.d_model
            S = len(self.scenes)
            return Interests(users, h, has, np.zeros((0, S + 1, d), np.float32), np.zeros((0, S + 1, S), np.float32))
        ht = torch.from_numpy(h).to(self.device)
        H, a = self.model.fusion(ht, torch.from_numpy(has).to(self.device))
        return Interests(users, h, has, H.float().cpu().numpy(), a.float().cpu().numpy())

    def item_vectors(self) -> tuple[list[str], list[str], np.ndarray]:
        """The catalog the index serves: item ids, their scenes, and their embedding rows."""
        with torch.no_grad():
            E = self.model.item_vectors()[FIRST_ITEM:].float().cpu().numpy()
        return self.ckpt.vocab.item_ids, self.ckpt.vocab.item_scenes, np.ascontiguousarray(E)
