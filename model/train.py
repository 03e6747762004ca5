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
The context of event k is, per scene i, the encoder output at the user's last event in scene i before k. Terms:
  fused  : CE of H_j (j = scene of event k) over the items of scene j     -- what per-scene serving ranks with
  global : CE of the global fused vector over all items                   -- the scene-free vector
  scene  : CE of h_j alone over the items of scene j, where j has history -- keeps h_j a usable interest
With one scene the global vector equals H_j (model.py), so only the global term is computed: the other two would
repeat it (fused) or train a vector nothing serves (scene).
With probability `scene_dropout` the target scene's own history is hidden from the fusion (when another scene has
history), so the fusion learns to transfer interest from other scenes: the case of a user new to a scene.
Long users are cut into segments of `segment` targets, each with the receptive field's worth of earlier events as
context, so attention stays short. The learning rate warms up, then decays to 0 over the planned epochs (cosine).
The caller owns the data protocol: it gives the training timelines (time-ordered, held-out events already removed)
and a `validate` function (for SceneStream, time-ordered leave-one-out on each user's second-last event, full
ranking with the global vector, history masked: scenestream.stream.leave_one_out). The best epoch by validation
NDCG@10 is kept and training stops after `patience` epochs without a better one.
"""
from __future__ import annotations

import copy
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
from .model import FIRST_ITEM, InterestModel, ModelConfig
from .vocab import ItemVocab, pack

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_users: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_events: int = 1000      # newest events per user used for training
    segment: int = 32           # targets per training segment: long users are cut so attention stays short
    scene_dropout: float = 0.25
    warmup_steps: int = 100     # linear warm-up (at most 10% of all steps), then cosine decay to 0 at the last
                                # planned epoch
    patience: int = 3           # epochs without a better validation NDCG@10 before stopping
    val_users: int = 2000       # validation sample size (0 = all users)
    seed: int = 0
    threads: int = 0            # torch CPU threads (0 = torch's default)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Cosine decay after a linear warm-up: a fixed epoch budget ends at a low learning rate, which is where most of
    the last epochs' gain comes from, instead of wherever a constant rate happened to be."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@dataclass
class _UserExample:
    seqs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]  # (scene, items, actions, ts) per scene with events
    slot: np.ndarray        # [S] index into seqs per scene, -1 if none
    ctx: np.ndarray         # [n-1, S] position inside that scene's seq of the last event before the target, -1
    target_item: np.ndarray  # [n-1]
    target_scene: np.ndarray  # [n-1]


def _example(tl: Sequence, vocab: ItemVocab, scene_index, action_index, skip: int = 1
             ) -> Optional[_UserExample]:
    """Targets are tl[skip:]; the events before `skip` are context only."""
    S = len(scene_index)
    if len(tl) <= skip:
        return None
    scene_of = np.array([scene_index[e.scene] for e in tl])
    items = np.array(vocab.rows(e.item_id for e in tl))
    actions = np.array([action_index.get(e.action, 0) for e in tl])
    ts = np.array([e.ts for e in tl], dtype=np.int64)
    seqs, slot = [], np.full(S, -1)
    pos_in_seq = np.zeros(len(tl), dtype=np.int64)
    for s in range(S):
        idx = np.flatnonzero(scene_of == s)
        if idx.size:
            slot[s] = len(seqs)
            seqs.append((s, items[idx], actions[idx], ts[idx]))
            pos_in_seq[idx] = np.arange(idx.size)
    ctx = np.full((len(tl), S), -1, dtype=np.int64)
    last = np.full(S, -1, dtype=np.int64)
    for k in range(len(tl)):
        ctx[k] = last
        last[scene_of[k]] = pos_in_seq[k]
    return _UserExample(seqs, slot, ctx[skip:], items[skip:], scene_of[skip:])


PAD_TO = 32   # batch widths are rounded up to a multiple of this (see _collate)


def _collate(examples: list[_UserExample], n_scenes: int, gap_buckets: int):
    """Users -> one padded batch of all their per-scene sequences + flat indices of each target's context. The
    width is rounded up to a multiple of PAD_TO: with a new width at every step, glibc's heap kept the freed
    blocks of every size apart and the process grew by ~300 MB an epoch on ML-100k (~2.4 GB after five); with a
    few widths it stays flat after the first epoch (BENCHMARKS.md). Padding is masked, so it changes nothing but
    float rounding."""
    seqs = [s for ex in examples for s in ex.seqs]
    lengths = np.array([len(s[1]) for s in seqs])
    T = -(-int(lengths.max()) // PAD_TO) * PAD_TO
    batch = pack([(it, ac, np.full(len(it), s), t) for s, it, ac, t in seqs], T, gap_buckets)

    flat_ctx, t_items, t_scenes = [], [], []
    base = 0
    for ex in examples:
        f = np.full(ex.ctx.shape, -1, dtype=np.int64)
        for s in range(n_scenes):
            if ex.slot[s] < 0:
                continue
            seq = base + ex.slot[s]
            ok = ex.ctx[:, s] >= 0
            f[ok, s] = seq * T + (T - lengths[seq]) + ex.ctx[ok, s]
        flat_ctx.append(f)
        t_items.append(ex.target_item)
        t_scenes.append(ex.target_scene)
        base += len(ex.seqs)
    return list(batch.inputs()), torch.from_numpy(np.concatenate(flat_ctx)), torch.from_numpy(np.concatenate(t_items)), \
        torch.from_numpy(np.concatenate(t_scenes))


def _loss(model: InterestModel, batch, scene_bias: Optional[torch.Tensor], scene_dropout: float,
          gen: torch.Generator):
    """Sum of the three mean CEs (module docstring). All logits come from one matmul against the real items
    (PAD and OOV columns are dropped rather than masked): the softmax over the catalog is most of a step's cost."""
    tensors, ctx, t_item, t_scene = batch
    out = model.encoder(*tensors)                                     # [N, T, d]
    flat = out.reshape(-1, out.shape[-1])
    has = ctx >= 0
    h = flat[ctx.clamp(min=0)] * has[..., None]                       # [n, S, d]
    n = len(t_item)
    rows = torch.arange(n, device=ctx.device)
    had_own = has[rows, t_scene]
    fuse_has = has.clone()
    if scene_dropout > 0:
        others = has.sum(1) - had_own.long() > 0
        drop = (torch.rand(n, generator=gen, device="cpu").to(ctx.device) < scene_dropout) & others
        fuse_has[rows[drop], t_scene[drop]] = False
    H, _ = model.fusion(h, fuse_has)
    if has.shape[1] == 1:   # one scene: the global vector is H_j (model.py) and h_j is never served alone
        target = t_item - FIRST_ITEM
        return F.cross_entropy(H[:, -1] @ model.item_vectors()[FIRST_ITEM:].T, target)
    own = rows[had_own]
    V = torch.cat([H[rows, t_scene], H[:, -1], h[own, t_scene[own]]])  # fused, global, scene-only
    logits = V @ model.item_vectors()[FIRST_ITEM:].T                  # [2n + m, items]
    if scene_bias is not None:                                        # fused and scene-only rank within the scene
        logits = torch.cat([logits[:n] + scene_bias[t_scene], logits[n:2 * n],
                            logits[2 * n:] + scene_bias[t_scene[own]]])
    target = t_item - FIRST_ITEM
    ce = F.cross_entropy(logits, torch.cat([target, target, target[own]]), reduction="none")
    loss = ce[:n].mean() + ce[n:2 * n].mean()
    if len(own):
        loss = loss + ce[2 * n:].mean()
    return loss


BUDGET_STEPS = 20   # steps timed at the start to announce how long the whole run will take


def _say_budget(seconds: float, steps: int, per_epoch: int, epochs: int) -> None:
    """The time budget, from the first steps: a newcomer learns at once whether to wait or to pick a smaller run
    (validation after each epoch comes on top)."""
    epoch_s = seconds / max(1, steps) * per_epoch
    log.info("time budget: ~%.0f s per epoch (%d steps, timed over the first %d), %d epochs: ~%.1f min",
             epoch_s, per_epoch, steps, epochs, epoch_s * epochs / 60)


def train_model(timelines: Mapping[str, Sequence], vocab: ItemVocab, scenes: Sequence[str], actions: Sequence[str],
                window: int, validate: Callable[[Checkpoint], dict], model_cfg: dict | None = None,
                cfg: TrainConfig = TrainConfig(), device: str = "cpu", progress: bool = True) -> tuple[Checkpoint, dict]:
    """Train on each user's time-ordered events (objects with item_id, scene, action and ts; what is held out for
    validation and test already removed). `vocab` holds every item the model may score, the held-out ones too.
    `validate(checkpoint)` returns metrics with "ndcg@10", computed after each epoch. Returns a Checkpoint with the
    best-validation weights and a history dict."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
    for tl in train_tls:
        for start in range(1, len(tl), cfg.segment):
            lo = max(0, start - mc.receptive_field)   # context: encoded, not trained on
            ex = _example(tl[lo:start + cfg.segment], vocab, scene_index, action_index, skip=start - lo)
            if ex:
                examples.append(ex)
    scene_bias = None   # [S, items]: 0 for the scene's items, -inf elsewhere; not needed with one scene
    if len(scenes) > 1:
        scene_bias = torch.full((len(scenes), len(vocab.item_ids)), float("-inf"))
        for i, s in enumerate(vocab.item_scenes):
            scene_bias[scene_index[s], i] = 0.0
        scene_bias = scene_bias.to(dev)

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
            tensors, ctx, t_item, t_scene = _collate(chunk, len(scenes), mc.gap_buckets)
            batch = ([t.to(dev) for t in tensors], ctx.to(dev), t_item.to(dev), t_scene.to(dev))
            loss = _loss(model, batch, scene_bias, cfg.scene_dropout, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        val = validate(ckpt)
        history["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **val})
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_ndcg10=f"{val['ndcg@10']:.4f}")
        log.info("epoch %d: loss %.4f, validation NDCG@10 %.4f, %.0f s", epoch + 1, np.mean(losses),
                 val["ndcg@10"], time.time() - t0)
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
