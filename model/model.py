"""The interest model, readable at one sitting: a scene encoder and a cross-scene fusion.

SceneEncoder: causal self-attention (SASRec-style) over one (user, scene) window of events. Each event is the sum of
item, action, scene and time-gap embeddings. Attention is local: each layer looks back at most `span` positions, with
a learned bias per (head, offset) instead of absolute positions. So the output at the last position depends only on
the last n_layers * span + 2 events (the +1 is the time gap to the event before), never on where the window starts:
windows of length L >= n_layers * span + 2 encode the same at any batch size and padding, and per-position
activations could be cached and extended without ever changing (the incremental-encoding path).

Sources. Each (user, scene) window is encoded alone: its last output is h_s, the user's interest in scene s. The
user's events of all scenes, merged by time into one window (the newest L of them: a function of the per-scene
windows, so no new state), are encoded too: its last output is `recent`, the user's interest as of their newest
event in any scene, which sees the order of their recent events across scenes (what next-item prediction depends
on, and what the per-scene windows alone never show). With `scene_layers` > 0 the scene windows go through blocks
of their own (sharing the embeddings), so the timeline's blocks serve the timeline alone; 0 shares one stack.

SceneFusion ("interest transfer"): for target scene j, a_ij = softmax_i(q_j . k(h_i + e_i) / sqrt(d)) over the
scenes i where the user has history, H_j = LayerNorm(sum_i a_ij v(h_i) + recent). A user with no history in j still gets H_j
from the other scenes and their recent sequence: that is the transfer. A learned global query gives the global
vector the same way; with one scene h_s is `recent`, and the global vector is the plain sequence model's output mixed
once with itself.

Scores are inner products with the (tied) item embeddings: <H_j, E_item>.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .ring_attention import Ring, attend

PAD, OOV = 0, 1  # item index 0 pads a window, 1 stands for items the model never saw
FIRST_ITEM = 2   # rows before this are PAD and OOV: never a target, never recommended; item i is row FIRST_ITEM + i


def gap_bucket(gap_ms, buckets: int):
    """0 = no previous event in the window; else 1 + floor(log2(1 + seconds)), capped at buckets - 1: the b with
    1000 * 2^(b-1) <= 1000 + ms < 1000 * 2^b, found among integers (no rounding at an edge). Takes a tensor or a numpy
    array and gives the same kind: the streaming path buckets a few hundred gaps a batch, which numpy does in one call
    where a tensor takes several."""
    edges = 1000 * 2 ** np.arange(buckets - 1, dtype=np.int64)
    if isinstance(gap_ms, torch.Tensor):
        return torch.bucketize(gap_ms.clamp(min=0) + 1000, torch.from_numpy(edges).to(gap_ms.device), right=True)
    return np.searchsorted(edges, np.maximum(gap_ms, 0) + 1000, side="right")


@dataclass
class Past:
    """One layer's inputs at positions already encoded (its normed rows, which its keys and values are made from),
    for the incremental path: row b's P slots hold up to `span` positions before its new ones, left-padded.
    Positions are numbered per row, so rows with different numbers of past and new positions share a batch. Or
    `ring`: the rows where the cache holds them, read in place by the C kernel (model/ring_attention.py), and the
    rest None."""
    x: Optional[torch.Tensor]          # [B, P, C]
    valid: Optional[torch.Tensor]      # [B, P] bool
    pos: Optional[torch.Tensor]        # [B, P] long
    new_pos: Optional[torch.Tensor]    # [B, T] long: positions of the new slots
    ring: Optional[Ring] = None


class LocalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.span = cfg.n_heads, cfg.span
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.rel_bias = nn.Parameter(torch.zeros(cfg.n_heads, cfg.span + 1))
        self.dropout = cfg.dropout
        self._folded: Optional[tuple] = None   # (weights' versions, the extension's folded maps): `folded`

    def forward(self, x: torch.Tensor, valid: torch.Tensor, tail: Optional[int] = None,
                past: Optional[Past] = None, segment: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C]: new positions, attending to themselves and to `past` (up to `span` positions before them).
        tail: only the newest `tail` positions' outputs (None: all). segment [B, T] (no past): a row packs several
        sequences, which never attend to each other. Returns (outputs, x: what a later extension reads as its
        past)."""
        B, T, C = x.shape
        H, hd = self.n_heads, C // self.n_heads
        if past is not None and past.ring is not None:
            return self._attend_ring(x, past.ring, T if tail is None else min(tail, T)), x
        if past is None:     # positions are slots: one offset matrix for the whole batch
            q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
            qpos = kpos = torch.arange(T, device=x.device)[None]
            kvalid = valid
            P = 0
        else:                # each row has its own number of past positions: offsets from explicit positions
            kvalid = torch.cat([past.valid, valid], 1)
            kpos = torch.cat([past.pos, past.new_pos[:, -T:]], 1)   # a layer above may get the newest T alone
            qpos = kpos[:, -T:]
            P = past.x.shape[1]
        qslot = torch.arange(P, P + T, device=x.device)
        if tail is not None:  # only these positions are read downstream: skip the other queries
            qpos, qslot = qpos[:, -tail:], qslot[-tail:]
        offset = qpos[:, :, None] - kpos[:, None, :]                                   # [B or 1, Tq, Tk]
        own = qslot[:, None] == torch.arange(P + T, device=x.device)[None]             # padded queries see themselves
        allowed = (offset >= 0) & (offset <= self.span) & kvalid[:, None, :]               # [B, Tq, Tk]
        if segment is not None:
            allowed = allowed & (segment[:, qslot, None] == segment[:, None, :])
        allowed = allowed | own[None]
        if past is not None:
            return self._extend(x, past, allowed, offset), x
        if tail is not None:
            q = q[:, :, -tail:]
        bias = self.rel_bias[:, offset.clamp(0, self.span)].transpose(0, 1)            # [1, H, Tq, Tk]
        mask = torch.where(allowed[:, None], bias, float("-inf"))                      # [B, H, Tq, Tk]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=0.0)  # dropout on embeddings and MLP only: cheaper on CPU
        y = y.transpose(1, 2).contiguous().view(B, -1, C)
        return self.proj(y), x

    def _extend(self, x: torch.Tensor, past: Past, allowed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The new positions' outputs against `past` [B, P, C] and themselves, with no key or value formed: each head
        scores the rows through its folded query map and mixes the rows themselves, and one map takes every head's
        mix to the output (`folded`)."""
        B, T, C = x.shape
        H, Tq = self.n_heads, offset.shape[1]
        qk_map, qk_bias, out_map, out_bias, bias_table = self.folded()
        # as one [B * Tq, C] matrix: a slice of the columns (Tq < T) would go to torch as B small matmuls
        qk = F.linear(x[:, -Tq:].reshape(B * Tq, C), qk_map, qk_bias).view(B, Tq * H, C)   # rows (query, head)
        # one new position (live traffic: an event per window) is a row against itself: a product, not a matmul
        own = (qk * x).sum(2, keepdim=True) if T == 1 else qk @ x.transpose(1, 2)
        P = past.x.shape[1]   # 0: a window encoded whole, against nothing cached
        scores = (torch.cat([qk @ past.x.transpose(1, 2), own], 2) if P else own).view(B, Tq, H, -1)
        # the bias of each offset, -inf where a key is not allowed: one lookup, not a gather, a mask and a where
        mask = F.embedding(torch.where(allowed, offset.clamp(0, self.span), self.span + 1), bias_table)
        p = torch.softmax(scores + mask.transpose(2, 3), -1).view(B, Tq * H, -1)       # mask [B, Tq, Tk, H]
        mixed = p[..., P:] * x if T == 1 else p[..., P:] @ x                         # sum_j a_j x_j, per head
        if P:
            mixed = mixed + p[..., :P] @ past.x
        return F.linear(mixed.view(B, Tq, H * C), out_map, out_bias)

    def _attend_ring(self, x: torch.Tensor, ring: Ring, Tq: int) -> torch.Tensor:
        """`_extend` with the past read where the cache holds it: the folded maps in torch, the scores, softmax and
        mix of the last Tq columns' queries in one pass of C (model/ring_attention.py)."""
        B, T, C = x.shape
        qk_map, qk_bias, out_map, out_bias, bias_table = self.folded()
        qk = F.linear(x[:, -Tq:].reshape(B * Tq, C), qk_map, qk_bias).view(B, Tq, self.n_heads, C)
        mixed = attend(qk, x, ring, bias_table)
        return F.linear(mixed.view(B, Tq, self.n_heads * C), out_map, out_bias)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The extension's two maps, for inference (autograd sees constants). A head's score of a row x_j is
        q . (W_k x_j + b_k) / sqrt(hd) = (W_k^T (W_q x + b_q) / sqrt(hd)) . x_j + (a term the same for every key of
        the query, which softmax ignores): so x goes to "key space" by one [H*C, C] map. The weights sum to 1, so
        the head's value mix is W_v (sum_j a_j x_j) + b_v, and the output W_o concat_h(...) + b_o is one [C, H*C] map
        of the heads' mixed rows plus W_o b_v + b_o. Two matmuls where there were four, no per-head transposes, and
        the cache holds x (C floats a position, not 2C). With them the relative bias by offset, [span + 2, H], its
        last row -inf (a key not allowed). Made in float64, again when the weights change."""
        weights = (self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.rel_bias)
        versions = tuple((w.data_ptr(), w._version) for w in weights)
        if self._folded is None or self._folded[0] != versions:
            with torch.no_grad():
                C = self.qkv.weight.shape[1]
                H, hd = self.n_heads, C // self.n_heads
                W, b = self.qkv.weight.double().view(3, H, hd, C), self.qkv.bias.double().view(3, H, hd)
                Wo, bo = self.proj.weight.double().view(C, H, hd), self.proj.bias.double()
                scale = 1.0 / math.sqrt(hd)
                qk_map = torch.einsum("hkc,hke->hce", W[1], W[0]).reshape(H * C, C) * scale   # W_k,h^T W_q,h
                qk_bias = torch.einsum("hkc,hk->hc", W[1], b[0]).reshape(H * C) * scale
                out_map = torch.einsum("chk,hke->che", Wo, W[2]).reshape(C, H * C)          # W_o,h W_v,h
                out_bias = bo + torch.einsum("chk,hk->c", Wo, b[2])
                bias_table = torch.cat([self.rel_bias.double().T, torch.full_like(self.rel_bias[:, :1].double().T,
                                                                                  float("-inf"))])
                dtype = self.qkv.weight.dtype
                self._folded = (versions, tuple(t.to(dtype).contiguous() for t in (qk_map, qk_bias, out_map,
                                                                                    out_bias, bias_table)))
        return self._folded[1]

    def read_only(self, x: torch.Tensor, valid: torch.Tensor, read: torch.Tensor,
                  segment: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training, a stack's last layer: the outputs at the positions `read` [B, T] marks alone, [R, C] in
        row-major order (x[read]'s), equal to forward(x, valid, segment=segment)[0][read]. Queries and attention run
        from the first column any row reads on (a timeline's targets are its last positions), keys and values from
        `span` before it (no query looks further back), the output projection on the read positions alone. The
        columns are shared by all rows, so the offsets and the bias stay one [Tq, Tk] matrix for the batch."""
        B, T, C = x.shape
        cols = read.any(0).nonzero()
        if not len(cols):
            return x.new_zeros(0, C)
        first = int(cols[0])                                  # no read position before this column in any row
        lo = max(0, first - self.span)                        # nor a key any of them may attend to
        x, valid = x[:, lo:], valid[:, lo:]
        W, b = self.qkv.weight, self.qkv.bias
        heads = lambda t: t.view(B, -1, self.n_heads, C // self.n_heads).transpose(1, 2)
        q = heads(F.linear(x[:, first - lo:], W[:C], b[:C]))
        k, v = (heads(t) for t in F.linear(x, W[C:], b[C:]).split(C, dim=2))
        kpos = torch.arange(T - lo, device=x.device)
        offset = kpos[first - lo:, None] - kpos[None]                                  # [Tq, Tk]
        allowed = (offset >= 0) & (offset <= self.span) & valid[:, None, :]               # [B, Tq, Tk]
        if segment is not None:
            segment = segment[:, lo:]
            allowed = allowed & (segment[:, first - lo:, None] == segment[:, None, :])
        allowed = allowed | (offset == 0)                     # padded queries see themselves
        # attention written out: the bias added once, no [B, H, Tq, Tk] mask built apart, none of SDPA's checks for
        # rows with no key (every row has its own)
        scores = q @ k.transpose(2, 3) * (1.0 / math.sqrt(C // self.n_heads)) \
            + self.rel_bias[:, offset.clamp(0, self.span)]                             # [B, H, Tq, Tk]
        y = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1) @ v   # [B, H, Tq, hd]
        return self.proj(y.transpose(1, 2)[read[:, first:]].reshape(-1, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = LocalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x, valid, tail=None, past=None, segment=None, read=None):
        """read [B, T] bool (training, a stack's last block): only the positions whose output is read; returns
        [R, C], their outputs in row-major order (x[read]'s), and no rows for a later extension (None). Everything
        on the query side runs on those alone: a read position needs the others' keys and values, never their
        outputs."""
        if read is not None:
            x = x[read] + self.attn.read_only(self.ln1(x), valid, read, segment)
            return x + self.mlp(self.ln2(x)), None
        y, present = self.attn(self.ln1(x), valid, tail, past, segment)
        x = (x if tail is None else x[:, -tail:]) + y
        return x + self.mlp(self.ln2(x)), present


class SceneEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(cfg.n_items, cfg.d_model, padding_idx=PAD)
        self.action = nn.Embedding(cfg.n_actions, cfg.d_model)
        self.scene = nn.Embedding(cfg.n_scenes, cfg.d_model)
        self.gap = nn.Embedding(cfg.gap_buckets, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        if cfg.own_scene_stack:   # the embeddings stay shared: one item table, tied to the scores
            self.scene_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.scene_layers))
            self.scene_ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, items, actions, scenes, gaps, valid, last_only: bool = False, scene: bool = False,
                segment: Optional[torch.Tensor] = None, read: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Left-padded windows [B, T] -> [B, T, d] (or [B, d] for the last position when last_only). scene: the
        windows are per-scene ones (their own stack, if the model has one), else merged timelines. segment [B, T]:
        rows that pack several sequences (training), each sequence's positions one id. read [B, T] (training):
        only these positions' outputs, [R, d] in row-major order (what [B, T, d][read] would give); the others are
        context, wanted for their keys and values only."""
        return self.extend(items, actions, scenes, gaps, valid, None, last_only, scene, segment, read)[0]

    def extend(self, items, actions, scenes, gaps, valid, past: Optional[list[Past]], last_only: bool = True,
               scene: bool = False, segment: Optional[torch.Tensor] = None, read: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """New positions [B, T] given each layer's `past` (None: the windows start here) -> (outputs as forward,
        each layer's inputs at the new positions [B, T, C]: a later extension's past). Because attention is local,
        appending k events to a window costs k positions per layer instead of the whole window; and with last_only a
        layer gives outputs only where the layers above read them (the last position, `span` back per layer)."""
        blocks, ln_f = (self.scene_blocks, self.scene_ln_f) if scene and self.cfg.own_scene_stack else \
            (self.blocks, self.ln_f)
        x = self.item(items) * math.sqrt(self.cfg.d_model) + self.action(actions) + self.scene(scenes) + self.gap(gaps)
        x = self.drop(x)
        presents = []
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            tail = (len(blocks) - 1 - i) * self.cfg.span + 1 if last_only else None
            x, rows = block(x, valid[:, -x.shape[1]:], tail, past[i] if past else None, segment,
                            read if last else None)
            presents.append(rows)
        x = ln_f(x)
        return (x[:, -1] if last_only else x), presents


class SceneFusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.query = nn.Parameter(torch.randn(cfg.n_scenes + 1, d) * 0.02)  # one per target scene + global
        self.scene_key = nn.Embedding(cfg.n_scenes, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, has: torch.Tensor, recent: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, S, d], has [N, S] (each row has at least one True), recent [N, d] -> H [N, S+1, d], a [N, S+1, S].
        Row S of H and a is the global vector and its weights. targets [N, T] (training): only these rows of H
        (target scenes, S for the global one), in that order: a step reads two of the S+1, and the rest would cost
        it a third of the fusion's time. has may also be [N, S+1, S] (or [N, T, S]): which scenes each target may
        read (training hides a target scene's own history from its H_j only)."""
        _, S, d = h.shape
        # q_t . key(h_s + e_s), with the key map folded into the queries: no key vector per (user, scene) is formed
        q = self.query @ self.key.weight                                                   # [S+1, d]
        prior = q @ self.scene_key.weight.T + (self.query @ self.key.bias)[:, None]       # [S+1, S]
        hq = h @ q.T                                                                       # [N, S, S+1]: one mm
        if targets is None:
            scores = hq.transpose(1, 2) + prior                                            # [N, S+1, S]
        else:
            scores = hq.gather(2, targets[:, None, :].expand(-1, S, -1)).transpose(1, 2) + prior[targets]
        scores = scores / math.sqrt(d)
        scores = scores.masked_fill(~(has if has.dim() == 3 else has[:, None, :]), float("-inf"))
        a = torch.softmax(scores, dim=-1)
        if targets is None:
            H = a @ self.value(h)                                                          # [N, S+1, d]
        else:   # a's rows sum to 1, so a @ value(h) = value(a @ h): the map on T rows per user instead of S
            H = self.value(a @ h)                                                          # [N, T, d]
        # residual: the user's interest as of their newest event, for every target: the scene mix adds to what the
        # plain sequence model would say, never replaces it
        return self.out(H + recent[:, None]), a


class InterestModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SceneEncoder(cfg)
        self.fusion = SceneFusion(cfg)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def item_vectors(self) -> torch.Tensor:
        """[n_items, d]: row i scores item index i. Rows PAD and OOV are never recommended."""
        return self.encoder.item.weight
