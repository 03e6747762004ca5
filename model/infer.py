"""Windows in, interest vectors out: one batched forward for every window touched in a micro-batch.

The live worker and replay both call `InterestEncoder.interests`; the vectors are a pure function of the windows
(the exactness contract). A window that grew by k events since it was last encoded costs k positions per layer
(window_cache.py); one that did not change costs nothing, so a user touched in one scene does not re-encode the
others. The cache is derived, bounded and may be dropped at any time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint
from .model import FIRST_ITEM, Past
from .vocab import tensorize
from .window_cache import WindowCache

DEFAULT_CACHE_MB = 256   # ~10,000 (user, scene) windows at d=64, span 24


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
                 cache_mb: float = DEFAULT_CACHE_MB):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.model = ckpt.model.to(self.device).eval()
        self.scenes = ckpt.scenes
        self.scene_index = {s: i for i, s in enumerate(ckpt.scenes)}
        self.action_index = {a: i for i, a in enumerate(ckpt.actions)}
        self.batch_size = batch_size
        self.cache = WindowCache(self.model.cfg, ckpt.window, int(cache_mb * 2**20), self.device)

    @property
    def version(self) -> str:
        return self.ckpt.version

    @property
    def window(self) -> int:
        return self.ckpt.window

    @torch.inference_mode()
    def encode_windows(self, windows: Sequence[Sequence]) -> np.ndarray:
        """[N] windows -> [N, d] last-position outputs of a full encode (no cache)."""
        return self._encode(windows, rows=False)[0].float().cpu().numpy()

    def _encode(self, windows: Sequence[Sequence], past: tuple[torch.Tensor, torch.Tensor] | None = None,
                starts: Sequence[int] | None = None, rows: bool = True):
        """Outputs [N, d] of whole windows, or of windows from `starts` on given `past` (their cached rows:
        keys/values [N, layers, 2, H, span, hd] and valid [N, span]); with `rows`, also each window's rows to
        cache (as past) and their valid counts. In chunks of batch_size, sorted by length so a chunk pads little:
        results do not depend on the chunking."""
        cfg = self.model.cfg
        n = len(windows)
        new = [len(w) - (starts[i] if starts else 0) for i, w in enumerate(windows)]
        out = torch.zeros(n, cfg.d_model, device=self.device)
        kv = torch.zeros(n, *self.cache.kv.shape[1:], device=self.device) if rows else None
        counts = torch.zeros(n, dtype=torch.long, device=self.device)
        order = sorted(range(n), key=new.__getitem__)
        for lo in range(0, n, self.batch_size):
            idx = order[lo:lo + self.batch_size]
            width = min(max(new[i] for i in idx), self.window)
            batch = tensorize([windows[i] for i in idx], self.ckpt.vocab, self.scene_index, self.action_index,
                              cfg.gap_buckets, width, [starts[i] for i in idx] if starts else None).to(self.device)
            at = torch.tensor(idx, device=self.device)
            layers = None
            valid = batch.valid
            if past is not None:
                past_kv, past_valid = past[0][at], past[1][at]
                span = past_valid.shape[1]
                pos = torch.arange(-span, 0, device=self.device).expand(len(idx), span)
                new_pos = torch.arange(width, device=self.device)[None] - (width - batch.valid.sum(1))[:, None]
                layers = [Past(past_kv[:, l, 0], past_kv[:, l, 1], past_valid, pos, new_pos)
                          for l in range(cfg.n_layers)]
                valid = torch.cat([past_valid, batch.valid], 1)
            h, presents = self.model.encoder.extend(*batch.inputs(), layers, last_only=True)
            out[at] = h
            if rows:
                if layers is not None:
                    presents = [(torch.cat([p.k, k], 2), torch.cat([p.v, v], 2)) for p, (k, v) in zip(layers, presents)]
                kv[at], counts[at] = _last_rows(presents, valid, cfg.span)
        return out, kv, counts

    def _scene_vectors(self, states: Sequence[Mapping[str, Sequence]], users: Sequence[str]) -> np.ndarray:
        S, d = len(self.scenes), self.model.cfg.d_model
        h = torch.zeros(len(users), S, d, device=self.device)
        hits, grown, whole = [], [], []   # (u, s, key, window, entry, start)
        for u, (user, state) in enumerate(zip(users, states)):
            for scene, window in state.items():
                s = self.scene_index.get(scene)
                if s is None or not window:
                    continue
                entry, start = self.cache.lookup((user, scene), window)
                todo = whole if entry is None else hits if start == len(window) else grown
                todo.append((u, s, (user, scene), window, entry, start))
        if hits:
            h[[t[0] for t in hits], [t[1] for t in hits]] = self.cache.vectors([t[4] for t in hits])
        caching = self.cache.capacity > 0
        done = []
        for todo in (grown, whole):   # every cached row is gathered before any is stored: a store may evict
            if todo:
                past = self.cache.past([t[4] for t in todo]) if todo is grown else None
                starts = [t[5] for t in todo] if todo is grown else None
                vec, kv, counts = self._encode([t[3] for t in todo], past, starts, rows=caching)
                h[[t[0] for t in todo], [t[1] for t in todo]] = vec
                done.append((todo, vec, kv, counts))
        if caching:
            for todo, vec, kv, counts in done:
                self.cache.store([t[2] for t in todo], [t[3] for t in todo], kv, counts, vec)
        return h.float().cpu().numpy()

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


def _last_rows(layers: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor, span: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's last `span` valid positions, right-aligned, from per-layer keys/values [B, H, P, hd] whose
    valid slots [B, P] may have padding in between (cached rows, then left-padded new ones)
    -> ([B, layers, 2, H, span, hd], valid counts [B])."""
    P = valid.shape[1]
    if P < span:
        layers = [(F.pad(k, (0, 0, span - P, 0)), F.pad(v, (0, 0, span - P, 0))) for k, v in layers]
        valid = F.pad(valid, (span - P, 0), value=False)
    order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, -span:]   # padding first, then in order
    k0 = layers[0][0]
    at = order[:, None, :, None].expand(-1, k0.shape[1], -1, k0.shape[3])
    kv = torch.stack([torch.stack([k.gather(2, at), v.gather(2, at)], 1) for k, v in layers], 1)
    return kv, valid.sum(1).clamp(max=span)
