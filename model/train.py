"""Training: next-item prediction over each user's time-ordered events, with full-softmax cross-entropy.

The loss, and why. For every event k of a user (k >= 1) the model predicts item_k from the events before it, and
pays -log softmax(scores)[item_k], the softmax taken over every item of the catalog (full-softmax cross-entropy,
as BERT4Rec and SASRec trained with CE, "SASRec+", do). Reasons:
  - It is the quantity the evaluation and the index use: one item ranked against all items by <vector, item>. The
    original SASRec loss (binary CE against one sampled negative) optimizes a different, much easier task, and
    Klenitskiy & Vasilev (RecSys 2023) and Petrov & Macdonald (gSASRec, RecSys 2023) show that this, not the
    architecture, is most of the gap between SASRec and BERT4Rec: with full CE SASRec leads.
  - No sampling: no sampling bias to correct, no extra hyper-parameters, and the gradient pushes down the items
    that are actually ranked high, which sampled negatives rarely are.
  - It is affordable: with a few thousand items one [targets x items] matmul per step is most of the step's cost,
    and it stays exact. A catalog of millions would need sampled softmax with a logQ correction instead.
The context of event k (model.py, "Sources"): per scene i, the encoder output at the user's last event in scene i
before k (h_i, from that scene's own sequence), and the output at event k-1 of the user's timeline of all scenes
(`recent`). Terms:
  fused  : CE of H_j (j = scene of event k) over the items of scene j     -- what per-scene serving ranks with
  global : CE of the global fused vector over all items                   -- the scene-free vector
  scene  : CE of h_j alone over the items of scene j, where j has history -- keeps h_j a usable interest
The two in-scene terms take their softmax over the scene's own items only (one small matmul per scene): each costs
the global term times sum_s (share of targets in s) x (share of items in s), about half of it with ML-1M's genres.
With one scene the global vector equals H_j and h_j is `recent`, so only the global term is computed.
With probability `scene_dropout` the target scene's own history is hidden from H_j (when another scene has
history), so the fusion learns to transfer interest from other scenes: the case of a user new to a scene. The global
vector always reads every scene: hiding the next event's scene from it would train it on a condition it never
meets when serving, one that tells it where the next event is not.
Long users are cut into segments of `segment` targets, each with the receptive field's worth of earlier events as
context, so attention stays short. The learning rate warms up, then decays to 0 over the planned epochs (cosine).
The caller owns the data protocol: it gives the training timelines (time-ordered, held-out events already removed)
and a `validate` function (for SceneStream, time-ordered leave-one-out on each user's second-last event, full
ranking with the global vector, history masked: scenestream.stream.offline.leave_one_out). The best epoch by validation
NDCG@10 is kept and training stops after `patience` epochs without a better one.
"""
from __future__ import annotations

import copy
import ctypes
import math
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import Checkpoint
from .config import ModelConfig, TrainConfig
from .model import FIRST_ITEM, InterestModel, gap_bucket
from .vocab import ItemVocab

log = logging.getLogger(__name__)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Cosine decay after a linear warm-up: a fixed epoch budget ends at a low learning rate, which is where most of
    the last epochs' gain comes from, instead of wherever a constant rate happened to be."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@dataclass
class _Segment:
    """A run of one user's events, tensorised once (before the first epoch): the model's inputs per sequence (the
    timeline of all scenes first, then one per scene with events) and, per target, where its context sits."""
    seqs: list[np.ndarray]  # [4, n_i] item rows, action ids, scene ids, gap buckets
    ctx: np.ndarray         # [m, S] (sequence, position) of the last event of scene s before the target, flattened
                            # as sequence * n + position (n: the timeline's length); -1 where none
    target: np.ndarray      # [m] position of each target in the timeline (`recent` reads the one before it)
    target_item: np.ndarray  # [m]
    target_scene: np.ndarray  # [m]


def _inputs(items, actions, scenes, ts, gap_buckets: int) -> np.ndarray:
    t = torch.from_numpy(ts)
    gaps = torch.zeros(len(ts), dtype=torch.int64)
    gaps[1:] = gap_bucket(t[1:] - t[:-1], gap_buckets)
    return np.stack([items, actions, scenes, gaps.numpy()]).astype(np.int64)


def _segment(tl: Sequence, vocab: ItemVocab, scene_index, action_index, gap_buckets: int,
             skip: int = 1) -> Optional[_Segment]:
    """Targets are tl[skip:]; the events before `skip` are context only."""
    S, n = len(scene_index), len(tl)
    if n <= skip:
        return None
    scenes = np.array([scene_index[e.scene] for e in tl])
    items = np.array(vocab.rows(e.item_id for e in tl))
    actions = np.array([action_index.get(e.action, 0) for e in tl])
    ts = np.array([e.ts for e in tl], dtype=np.int64)
    seqs = [_inputs(items, actions, scenes, ts, gap_buckets)]
    flat_pos = np.zeros(n, dtype=np.int64)     # each event's place in its scene's sequence, flattened
    if S > 1:
        for s in range(S):
            idx = np.flatnonzero(scenes == s)
            if idx.size:
                flat_pos[idx] = len(seqs) * n + np.arange(idx.size)
                seqs.append(_inputs(items[idx], actions[idx], scenes[idx], ts[idx], gap_buckets))
    else:
        flat_pos = np.arange(n)                # one scene: its sequence is the timeline
    ctx = np.full((n, S), -1, dtype=np.int64)
    last = np.full(S, -1, dtype=np.int64)
    for k in range(n):
        ctx[k] = last
        last[scenes[k]] = flat_pos[k]
    return _Segment(seqs, ctx[skip:], np.arange(skip, n), items[skip:], scenes[skip:])


PAD_TO = 32       # batch widths are rounded up to a multiple of this (see _collate)
PACK_WIDTH = 64   # scene sequences up to this long share rows of this width (see _collate)


def _collate(segments: list[_Segment]):
    """Segments -> their sequences packed in groups of one width each, and flat indices (into the groups'
    outputs, concatenated) of each target's contexts. Attention costs a row its width squared, so a scene's short
    sequence must not pad to the timeline's width; and with a few widths only, glibc's heap stays flat (a new width
    at every step kept freed blocks of every size apart: the process grew by ~300 MB an epoch on ML-100k;
    BENCHMARKS.md). Timelines and long scene sequences get a row each, lengths rounded up to a multiple of PAD_TO;
    scene sequences up to PACK_WIDTH long share rows of that width, several to a row (most of a user's scenes hold
    a few events: one to a row, their slots were mostly padding), each marked by a segment id that attention
    keeps apart. Groups are (scene?, [items, actions, scenes, gaps, valid], segment ids or None). Padding is
    masked, so it changes nothing but float rounding."""
    seqs = [q for g in segments for q in g.seqs]
    lengths = np.array([q.shape[1] for q in seqs])
    widths = -(-lengths // PAD_TO) * PAD_TO
    scene = np.array([i > 0 for g in segments for i in range(len(g.seqs))])   # the timeline comes first
    packed = scene & (lengths <= PACK_WIDTH)
    start = np.zeros(len(seqs), dtype=np.int64)   # flat index of each sequence's first event
    groups, base = [], 0
    for kind, width in sorted({(bool(k), int(w)) for k, w in zip(scene[~packed], widths[~packed])}):
        members = np.flatnonzero((widths == width) & (scene == kind) & ~packed)
        arrays = np.zeros((4, len(members), width), dtype=np.int64)
        valid = np.zeros((len(members), width), dtype=bool)
        for b, i in enumerate(members):
            n = lengths[i]
            arrays[:, b, width - n:] = seqs[i]
            valid[b, width - n:] = True
            start[i] = base + b * width + width - n
        groups.append((kind, [torch.from_numpy(a) for a in arrays] + [torch.from_numpy(valid)], None))
        base += len(members) * width
    if packed.any():   # first fit, longest first
        members = np.flatnonzero(packed)
        members = members[np.argsort(-lengths[members], kind="stable")]
        free = np.full(len(members), PACK_WIDTH)
        row_of = np.zeros(len(members), dtype=np.int64)
        at = np.zeros(len(members), dtype=np.int64)
        for m, i in enumerate(members):
            row = int(np.argmax(free >= lengths[i]))
            row_of[m], at[m] = row, PACK_WIDTH - free[row]
            free[row] -= lengths[i]
        rows = int(row_of.max()) + 1
        arrays = np.zeros((4, rows, PACK_WIDTH), dtype=np.int64)
        valid = np.zeros((rows, PACK_WIDTH), dtype=bool)
        segment = np.full((rows, PACK_WIDTH), -1, dtype=np.int64)
        for m, i in enumerate(members):
            row, a, n = row_of[m], at[m], lengths[i]
            arrays[:, row, a:a + n] = seqs[i]
            valid[row, a:a + n] = True
            segment[row, a:a + n] = m
            start[i] = base + row * PACK_WIDTH + a
        groups.append((True, [torch.from_numpy(a) for a in arrays] + [torch.from_numpy(valid)],
                       torch.from_numpy(segment)))
        base += rows * PACK_WIDTH
    ctx, recent = [], []
    first = 0
    for g in segments:
        n = g.seqs[0].shape[1]
        seq, pos = g.ctx // n, g.ctx % n                     # which of the segment's sequences, where in it
        ctx.append(np.where(g.ctx >= 0, start[first + seq] + pos, -1))
        recent.append(start[first] + g.target - 1)
        first += len(g.seqs)
    cat = lambda parts: torch.from_numpy(np.concatenate(parts))  # noqa: E731
    return groups, cat(ctx), cat(recent), cat([g.target_item for g in segments]), \
        cat([g.target_scene for g in segments])


def scene_catalog(of_scene: np.ndarray, n_scenes: int, device: torch.device | str = "cpu"
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per scene: its items' catalog positions; [S, items]: an item's position among the items of scene s, -1
    where the item is not of s), from each catalog item's scene index."""
    scene_items = [torch.from_numpy(np.flatnonzero(of_scene == s)) for s in range(n_scenes)]
    pos = np.full((n_scenes, len(of_scene)), -1, dtype=np.int64)
    for s, items in enumerate(scene_items):
        pos[s, items.numpy()] = np.arange(len(items))
    return [items.to(device) for items in scene_items], torch.from_numpy(pos).to(device)


def _in_scene_ce(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], E: torch.Tensor,
                 scene_items: list[torch.Tensor], scene_pos: torch.Tensor) -> torch.Tensor:
    """Sum over parts (V [m, d], scene [m], target [m]: item positions in the catalog) of each part's mean CE of its
    rows against the items of their own scene only (`scene_catalog`). A row whose item is not of the row's scene
    has no in-scene term: a log may show one item in two scenes, and the catalog gives each item one scene (that of
    its first event). The parts' rows share one matmul per scene."""
    kept = []
    for V, scene, target in parts:
        pos = scene_pos[scene, target]
        ok = pos >= 0
        if not bool(ok.all()):
            V, scene, pos = V[ok], scene[ok], pos[ok]
        if len(V):
            kept.append((V, scene, pos))
    total = E.new_zeros(())
    if not kept:
        return total
    scene = torch.cat([p[1] for p in kept])
    order = torch.argsort(scene, stable=True)   # rows by scene: one gather, then a run per scene
    counts = torch.bincount(scene, minlength=len(scene_items)).tolist()
    V = torch.cat([p[0] for p in kept]).index_select(0, order).split(counts)
    target = torch.cat([p[2] for p in kept])[order].split(counts)
    weight = torch.cat([p[0].new_full((len(p[0]),), 1.0 / len(p[0])) for p in kept])[order].split(counts)
    # the catalog by scene, once: split, not sliced or gathered per scene, so the backward pass writes each gradient
    # once instead of zero-filling a catalog-sized one per scene
    E = E.index_select(0, torch.cat(scene_items)).split([len(items) for items in scene_items])
    for s, count in enumerate(counts):
        if count:
            ce = F.cross_entropy(V[s] @ E[s].T, target[s], reduction="none")
            total = total + (ce * weight[s]).sum()
    return total


def _encode(model: InterestModel, groups, ctx: torch.Tensor, recent_at: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs the loss reads: at ctx (-1: none) and recent_at, flat indices into the groups' positions. Most
    positions are context (a segment's targets need the receptive field before them, and each scene sequence its own)
    that only lends keys and values, so each stack's last block computes its outputs at the read positions alone.
    Returns (rows [R, d]: the read positions' outputs, in flat order; ctx and recent_at as indices into rows, ctx
    still -1 where none)."""
    read = torch.zeros(sum(g[0].numel() for _, g, _ in groups), dtype=torch.bool, device=ctx.device)
    read[ctx[ctx >= 0]] = True
    read[recent_at] = True
    outs, base = [], 0
    for kind, g, seg in groups:
        n = g[0].numel()
        outs.append(model.encoder(*g, scene=kind, segment=seg, read=read[base:base + n].view(g[0].shape)))
        base += n
    row = read.cumsum(0) - 1                 # flat position -> its row among the read ones
    return torch.cat(outs), torch.where(ctx >= 0, row[ctx.clamp(min=0)], -1), row[recent_at]


def _loss(model: InterestModel, batch, scene_items: Optional[list[torch.Tensor]], scene_pos: Optional[torch.Tensor],
          scene_dropout: float, gen: torch.Generator):
    """Sum of the three mean CEs (module docstring). Logits are taken against the real items only (PAD and OOV
    columns dropped rather than masked): the softmax over the catalog is most of a step's cost."""
    groups, ctx, recent_at, t_item, t_scene = batch
    out, ctx, recent_at = _encode(model, groups, ctx, recent_at)
    has = ctx >= 0
    # [n, S, d]; rows of scenes without history are masked in the fusion, never read. index_select: its backward
    # adds rows (index_add_), cheaper than advanced indexing's accumulating index_put
    h = out.index_select(0, ctx.clamp(min=0).view(-1)).view(*ctx.shape, -1)
    recent = out.index_select(0, recent_at)                           # [n, d]
    n = len(t_item)
    rows = torch.arange(n, device=ctx.device)
    had_own = has[rows, t_scene]
    S = has.shape[1]
    one_scene = scene_items is None   # the global vector is H_j (model.py) and h_j is `recent`
    targets = torch.stack([torch.full_like(t_scene, S)] + ([] if one_scene else [t_scene]), 1)   # global, H_j
    fuse_has = has[:, None, :].repeat(1, targets.shape[1], 1)       # [n, 1 or 2, S]: what each target row reads
    if scene_dropout > 0 and not one_scene:   # hidden from H_j only: the global vector never knows the next scene
        others = has.sum(1) - had_own.long() > 0
        drop = (torch.rand(n, generator=gen, device="cpu").to(ctx.device) < scene_dropout) & others
        fuse_has[rows[drop], 1, t_scene[drop]] = False
    H, _ = model.fusion(h, fuse_has, recent, targets)
    E = model.item_vectors()[FIRST_ITEM:]
    target = t_item - FIRST_ITEM
    loss = F.cross_entropy(H[:, 0] @ E.T, target)                    # global
    if one_scene:
        return loss
    own = rows[had_own]
    h_own = out.index_select(0, ctx[own, t_scene[own]])             # h_j where j has history: rows of h
    parts = [(H[:, 1], t_scene, target), (h_own, t_scene[own], target[own])]
    return loss + _in_scene_ce([p for p in parts if len(p[0])], E, scene_items, scene_pos)


def _steady_heap() -> None:
    """Keep freed tensor memory in glibc's heap rather than unmapping it. Each step allocates and frees the same
    few tens-of-MB tensors (logits, their gradients); by default glibc returns a large block to the kernel on free
    and takes page faults to zero it again on the next step, until its adaptive threshold catches up: a genre epoch
    ran ~8% slower for it, the first epoch most (measured on ML-1M). Elsewhere than glibc, nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)


BUDGET_STEPS = 20   # steps timed at the start to announce how long the whole run will take


def _say_budget(seconds: float, steps: int, per_epoch: int, epochs: int) -> None:
    """The time budget, from the first steps: a newcomer learns at once whether to wait or to pick a smaller run
    (validation after each epoch comes on top)."""
    epoch_s = seconds / max(1, steps) * per_epoch
    log.info("time budget: ~%.0f s per epoch (%d steps, timed over the first %d), %d epochs: ~%.1f min",
             epoch_s, per_epoch, steps, epochs, epoch_s * epochs / 60)


def train_model(timelines: Mapping[str, Sequence], vocab: ItemVocab, scenes: Sequence[str], actions: Sequence[str],
                window: int, validate: Callable[[Checkpoint], dict], model_cfg: dict | None = None,
                cfg: TrainConfig = TrainConfig(), device: str = "cpu", progress: bool = True
                ) -> tuple[Checkpoint, dict]:
    """Train on each user's time-ordered events (objects with item_id, scene, action and ts; what is held out for
    validation and test already removed). `vocab` holds every item the model may score, the held-out ones too.
    `validate(checkpoint)` returns metrics with "ndcg@10", computed after each epoch. Returns a Checkpoint with the
    best-validation weights and a history dict."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _steady_heap()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    scene_index = {s: i for i, s in enumerate(scenes)}
    action_index = {a: i for i, a in enumerate(actions)}
    mc = ModelConfig(n_items=len(vocab), n_scenes=len(scenes), n_actions=len(actions), **(model_cfg or {}))
    if window < mc.receptive_field:
        log.warning("window %d < receptive field %d: the oldest events of a full window influence vectors only "
                    "through truncation", window, mc.receptive_field)
    dev = torch.device(device)
    model = InterestModel(mc).to(dev)

    train_tls = [tl[-cfg.max_events:] for tl in timelines.values()]
    examples = []
    for tl in tqdm(train_tls, desc="segments", unit="user", disable=not progress):
        for start in range(1, len(tl), cfg.segment):
            lo = max(0, start - mc.receptive_field)   # context: encoded, not trained on
            seg = _segment(tl[lo:start + cfg.segment], vocab, scene_index, action_index, mc.gap_buckets,
                           skip=start - lo)
            if seg:
                examples.append(seg)
    scene_items, scene_pos = None, None   # the in-scene terms' catalog (`scene_catalog`)
    if len(scenes) > 1:
        scene_items, scene_pos = scene_catalog(np.array([scene_index[s] for s in vocab.item_scenes]), len(scenes),
                                               dev)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(examples) // cfg.batch_users)
    warmup = min(cfg.warmup_steps, steps // 10)   # short runs (tests, small data) must not spend them warming up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, steps, warmup))
    ckpt = Checkpoint(model, vocab, tuple(scenes), tuple(actions), window, version="training")
    history = {"epochs": [], "train_events": sum(len(tl) for tl in train_tls), "items": len(vocab.item_ids),
               "config": asdict(cfg), "model": mc.to_dict()}
    best, best_state, stale = -1.0, None, 0
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress)
    per_epoch = -(-len(examples) // cfg.batch_users)
    timed = min(BUDGET_STEPS, per_epoch)
    for epoch in bar:
        model.train()
        order = list(range(len(examples)))
        random.shuffle(order)
        losses = []
        t_epoch = time.time()
        for lo in range(0, len(order), cfg.batch_users):
            if epoch == 0 and len(losses) == timed:
                _say_budget(time.time() - t_epoch, timed, per_epoch, cfg.epochs)
            chunk = [examples[i] for i in order[lo:lo + cfg.batch_users]]
            groups, *rest = _collate(chunk)
            batch = ([(kind, [t.to(dev) for t in g], None if seg is None else seg.to(dev)) for kind, g, seg in groups],
                     *(t.to(dev) for t in rest))
            loss = _loss(model, batch, scene_items, scene_pos, cfg.scene_dropout, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        t_val = time.time()
        val = validate(ckpt)
        seconds = {"train_seconds": round(t_val - t_epoch, 1), "validation_seconds": round(time.time() - t_val, 1)}
        history["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **seconds, **val})
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_ndcg10=f"{val['ndcg@10']:.4f}")
        log.info("epoch %d: loss %.4f, validation NDCG@10 %.4f; %.0f s training, %.0f s validation, %.0f s in all",
                 epoch + 1, np.mean(losses), val["ndcg@10"], seconds["train_seconds"], seconds["validation_seconds"],
                 time.time() - t0)
        if val["ndcg@10"] > best:
            best, best_state, stale = val["ndcg@10"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history["best_val_ndcg@10"] = best
    history["seconds"] = round(time.time() - t0, 1)
    return ckpt, history
