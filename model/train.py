"""Training: next-item prediction over each user's time-ordered events, with full-softmax cross-entropy.

Why full softmax CE: it is what SASRec trained with CE (and gSASRec's analysis) shows closes the gap to the state of
the art, and catalogs here (a few thousand items) make the full softmax cheap. For every event k of a user (k >= 1),
the context is, per scene i, the encoder output at the user's last event in scene i before k. Three terms:
  fused  : CE of H_j (j = scene of event k) over the items of scene j     -- what serving ranks with
  global : CE of the global fused vector over all items                   -- the scene-free vector
  scene  : CE of h_j alone over the items of scene j, where j has history -- keeps h_j a usable interest
With probability `scene_dropout` the target scene's own history is hidden from the fusion (when another scene has
history), so the fusion learns to transfer interest from other scenes: the case of a user new to a scene.
Validation is time-ordered leave-one-out (second-last event), full ranking with the global vector, and training
stops early on NDCG@10.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stream.events import Event

from .checkpoint import Checkpoint
from .evaluate import evaluate_loo, loo_cases
from .infer import InterestEncoder
from .model import InterestModel, ModelConfig, OOV, PAD
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
    context: int = 48           # events before a segment encoded as its context (not trained on)
    scene_dropout: float = 0.25
    patience: int = 3           # epochs without a better validation NDCG@10 before stopping
    val_users: int = 2000       # validation sample size (0 = all users)
    seed: int = 0
    threads: int = 0            # torch CPU threads (0 = torch's default)


def timelines(events: Sequence[Event]) -> dict[str, list[Event]]:
    """user -> events ascending by (ts, event_id), deduplicated by event_id."""
    by_user: dict[str, dict[str, Event]] = {}
    for e in events:
        by_user.setdefault(e.user_id, {})[e.event_id] = e
    return {u: sorted(d.values(), key=Event.order_key.fget) for u, d in by_user.items()}


@dataclass
class _UserExample:
    seqs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]  # (scene, items, actions, ts) per scene with events
    slot: np.ndarray        # [S] index into seqs per scene, -1 if none
    ctx: np.ndarray         # [n-1, S] position inside that scene's seq of the last event before the target, -1
    target_item: np.ndarray  # [n-1]
    target_scene: np.ndarray  # [n-1]


def _example(tl: list[Event], vocab: ItemVocab, scene_index, action_index, skip: int = 1
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


def _collate(examples: list[_UserExample], n_scenes: int, gap_buckets: int):
    """Users -> one padded batch of all their per-scene sequences + flat indices of each target's context."""
    seqs = [s for ex in examples for s in ex.seqs]
    lengths = np.array([len(s[1]) for s in seqs])
    T = int(lengths.max())
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


def _loss(model: InterestModel, batch, scene_items: torch.Tensor, scene_dropout: float, gen: torch.Generator):
    tensors, ctx, t_item, t_scene = batch
    out = model.encoder(*tensors)                                     # [N, T, d]
    flat = out.reshape(-1, out.shape[-1])
    has = ctx >= 0
    h = flat[ctx.clamp(min=0)] * has[..., None]                       # [n, S, d]
    rows = torch.arange(len(t_item), device=ctx.device)
    had_own = has[rows, t_scene]
    fuse_has = has.clone()
    if scene_dropout > 0:
        others = has.sum(1) - had_own.long() > 0
        drop = (torch.rand(len(t_item), generator=gen, device="cpu").to(ctx.device) < scene_dropout) & others
        fuse_has[rows[drop], t_scene[drop]] = False
    H, _ = model.fusion(h, fuse_has)
    E = model.item_vectors()                                          # [n_items, d]
    in_scene = scene_items[t_scene]                                   # [n, n_items] bool
    fused = (H[rows, t_scene] @ E.T).masked_fill(~in_scene, float("-inf"))
    glob = H[:, -1] @ E.T
    glob[:, PAD] = float("-inf")
    glob[:, OOV] = float("-inf")
    loss = F.cross_entropy(fused, t_item) + F.cross_entropy(glob, t_item)
    if had_own.any():
        own = (h[rows[had_own], t_scene[had_own]] @ E.T).masked_fill(~in_scene[had_own], float("-inf"))
        loss = loss + F.cross_entropy(own, t_item[had_own])
    return loss


def train_model(events: Sequence[Event], scenes: Sequence[str], actions: Sequence[str], window: int,
                model_cfg: dict | None = None, cfg: TrainConfig = TrainConfig(), device: str = "cpu",
                progress: bool = True) -> tuple[Checkpoint, dict]:
    """Train on the events (validation = each user's second-last event, test = last, neither trained on).
    Returns a Checkpoint with the best-validation weights and a history dict."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tls = timelines(events)
    vocab = ItemVocab.from_events(e for tl in tls.values() for e in tl)
    scene_index = {s: i for i, s in enumerate(scenes)}
    action_index = {a: i for i, a in enumerate(actions)}
    mc = ModelConfig(n_items=len(vocab), n_scenes=len(scenes), n_actions=len(actions), **(model_cfg or {}))
    if window < mc.receptive_field:
        log.warning("window %d < receptive field %d: the oldest events of a full window influence vectors only "
                    "through truncation", window, mc.receptive_field)
    dev = torch.device(device)
    model = InterestModel(mc).to(dev)

    train_tls = {u: tl[:-2][-cfg.max_events:] for u, tl in tls.items() if len(tl) > 2}
    examples = []
    for tl in train_tls.values():
        for start in range(1, len(tl), cfg.segment):
            lo = max(0, start - cfg.context)
            ex = _example(tl[lo:start + cfg.segment], vocab, scene_index, action_index, skip=start - lo)
            if ex:
                examples.append(ex)
    val_users = sorted(u for u, tl in tls.items() if len(tl) > 2)
    if cfg.val_users and len(val_users) > cfg.val_users:
        val_users = random.Random(cfg.seed).sample(val_users, cfg.val_users)
    val_cases = loo_cases({u: tls[u][:-1] for u in val_users}, holdout=1)
    scene_items = torch.zeros(len(scenes), len(vocab), dtype=torch.bool)
    for i, s in enumerate(vocab.item_scenes):
        scene_items[scene_index[s], i + 2] = True
    scene_items = scene_items.to(dev)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Checkpoint(model, vocab, tuple(scenes), tuple(actions), window, version="training")
    history = {"epochs": [], "train_events": sum(len(tl) for tl in train_tls.values()),
               "users": len(tls), "items": len(vocab) - 2, "config": asdict(cfg), "model": mc.to_dict()}
    best, best_state, stale = -1.0, None, 0
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress)
    # longest users first inside each shuffled chunk keeps padding low
    for epoch in bar:
        model.train()
        order = list(range(len(examples)))
        random.shuffle(order)
        losses = []
        for lo in range(0, len(order), cfg.batch_users):
            chunk = [examples[i] for i in order[lo:lo + cfg.batch_users]]
            tensors, ctx, t_item, t_scene = _collate(chunk, len(scenes), mc.gap_buckets)
            batch = ([t.to(dev) for t in tensors], ctx.to(dev), t_item.to(dev), t_scene.to(dev))
            loss = _loss(model, batch, scene_items, cfg.scene_dropout, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        model.eval()
        enc = InterestEncoder(ckpt, dev, cache_size=0)
        val = evaluate_loo(enc, val_cases)
        history["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **val})
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_ndcg10=f"{val['ndcg@10']:.4f}")
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
