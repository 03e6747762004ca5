"""Where a training step's time goes, genre scenes against one scene, in one process.

Both models get the same users' segments of a MovieLens data set (--dataset, default ML-1M), built as `scenestream
train --dataset ml-1m` builds them (preset segment, span and scene stack; leave-one-out's held-out events removed),
and take full steps in turn, batch by batch: collate, loss, backward, clipping, AdamW. Then the genre-only parts
alone: the scene stack's forward and backward (the minimum over passes), and the two in-scene CE terms against the
global one on the inputs the steps gave them.
In-process figures understate the epoch ratio a little (BENCHMARKS.md, "Training cost"); the ratio itself is
`scenestream train --epochs 1` timed for each model.

    python bench/train_step.py [--users 800] [--batches 70] [--passes 2] [--threads 2] [--dataset ml-1m]
    python bench/train_step.py --dataset ml-100k --users 40 --batches 3 --passes 1     # a smoke run, seconds
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.nn.functional as F


def setup(mode: str, users: int, batches: int, dataset: str = "ml-1m"):
    from scenestream.model import train as T
    from scenestream.model.config import ModelConfig, preset, receptive_field
    from scenestream.model.model import InterestModel
    from scenestream.model.vocab import ItemVocab
    from scenestream.stream.cli.common import load
    from scenestream.stream.core.config import StreamConfig
    from scenestream.stream.offline.leave_one_out import timelines

    p = preset(dataset)
    window = receptive_field(max(ModelConfig.n_layers, p["scene_layers"]), p["span"])   # as train: 98 for ML-1M
    loaded = load(dataset, None, mode, StreamConfig.from_env(window=window))
    tls = timelines(loaded.events)
    vocab = ItemVocab.from_events(e for tl in tls.values() for e in tl)
    train_tls = [tl[:-2][-T.TrainConfig.max_events:] for tl in tls.values() if len(tl) > 2]
    mc = ModelConfig(n_items=len(vocab), n_scenes=len(loaded.scenes), n_actions=len(loaded.actions),
                     span=p["span"], scene_layers=p["scene_layers"])
    si = {s: i for i, s in enumerate(loaded.scenes)}
    ai = {a: i for i, a in enumerate(loaded.actions)}
    rng = random.Random(0)
    segments = []
    for u in rng.sample(range(len(train_tls)), users):   # as train_model cuts a user's timeline
        tl = train_tls[u]
        for start in range(1, len(tl), p["segment"]):
            lo = max(0, start - mc.receptive_field)
            seg = T._segment(tl[lo:start + p["segment"]], vocab, si, ai, mc.gap_buckets, skip=start - lo)
            if seg:
                segments.append(seg)
    rng.shuffle(segments)
    catalog = (None, None) if len(loaded.scenes) == 1 else \
        T.scene_catalog(np.array([si[s] for s in vocab.item_scenes]), len(loaded.scenes))
    torch.manual_seed(0)
    model = InterestModel(mc).train()
    b = p["batch_users"]
    chunks = [segments[i:i + b] for i in range(0, min(len(segments), b * batches), b)]
    return model, torch.optim.AdamW(model.parameters(), lr=p["lr"]), chunks, catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-1m", choices=["ml-1m", "ml-100k"],
                    help="MovieLens data set whose segments make the batches, with its training preset (default ml-1m)")
    ap.add_argument("--users", type=int, default=800, help="Users whose segments make the batches (default 800)")
    ap.add_argument("--batches", type=int, default=70, help="Batches per pass (default 70)")
    ap.add_argument("--passes", type=int, default=2, help="Passes over the batches (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from scenestream.model import train as T
    T._steady_heap()
    models = {mode: setup(mode, args.users, args.batches, args.dataset) for mode in ("genre", "single")}
    n = min(len(m[2]) for m in models.values())
    captured = []   # the in-scene CE's inputs of the genre steps, to time it alone
    in_scene = T._in_scene_ce

    def capture(parts, E, scene_items, scene_pos):
        if len(captured) < 16:
            captured.append(([(p[0].detach(), p[1], p[2]) for p in parts], E.detach()))
        return in_scene(parts, E, scene_items, scene_pos)

    phases = ("collate", "forward", "backward", "clip", "AdamW")
    spent = {mode: dict.fromkeys(phases, 0.0) for mode in models}
    gen = torch.Generator().manual_seed(0)
    T._in_scene_ce = capture
    for _ in range(args.passes):
        for i in range(n):
            for mode, (model, opt, chunks, (items, pos)) in models.items():
                t = [time.perf_counter()]
                batch = T._collate(chunks[i])
                t.append(time.perf_counter())
                loss = T._loss(model, batch, items, pos, 0.25, gen)
                loss.item()
                t.append(time.perf_counter())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t.append(time.perf_counter())
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                t.append(time.perf_counter())
                opt.step()
                t.append(time.perf_counter())
                for ph, a, b in zip(phases, t, t[1:]):
                    spent[mode][ph] += b - a
    T._in_scene_ce = in_scene
    steps = n * args.passes
    total = {}
    for mode, s in spent.items():
        total[mode] = 1000 * sum(s.values()) / steps
        print(f"{mode:6s} full step {total[mode]:6.1f} ms: " + ", ".join(f"{ph} {1000 * v / steps:.1f}"
                                                                          for ph, v in s.items()))
    print(f"genre / one scene: {total['genre'] / total['single']:.2f}x ({steps} steps each, interleaved)")

    model, _, chunks, (items, pos) = models["genre"]

    def scene_stack(batch):   # the scene groups' encoder, forward and backward, at the positions the loss reads
        groups, ctx, recent_at, *_ = batch
        read = torch.zeros(sum(g[0].numel() for _, g, _ in groups), dtype=torch.bool)
        read[ctx[ctx >= 0]] = True
        read[recent_at] = True
        base, out = 0, 0
        for scene, g, seg in groups:
            size = g[0].numel()
            if scene:
                out = out + model.encoder(*g, scene=True, segment=seg,
                                          read=read[base:base + size].view(g[0].shape)).sum()
            base += size
        out.backward()

    def ce(fn):
        def run(c):
            parts, E = c
            parts = [(p[0].clone().requires_grad_(), p[1], p[2]) for p in parts]
            fn(parts, E.clone().requires_grad_()).backward()
        return run

    def best(f, xs, passes=4):
        ms = []
        for _ in range(passes):
            t = time.perf_counter()
            for x in xs:
                f(x)
            ms.append(1000 * (time.perf_counter() - t) / len(xs))
        return min(ms)

    print(f"genre only, minimum of 4 passes: scene stack forward + backward {best(scene_stack, [T._collate(c) for c in chunks[:16]]):.1f} ms "
          f"a step; in-scene CE terms {best(ce(lambda p, E: in_scene(p, E, items, pos)), captured):.1f} ms against "
          f"the global CE term {best(ce(lambda p, E: F.cross_entropy(p[0][0] @ E.T, p[0][2])), captured):.1f} ms "
          f"(forward + backward, on the inputs of {len(captured)} steps)")


if __name__ == "__main__":
    main()
