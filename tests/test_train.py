"""Training's batches. Rounding a batch's width up (model/train.py, PAD_TO) keeps the allocator's block sizes few;
it must not change what is trained. And what training reads as a target's context must be what serving reads from
the user's windows (model/infer.py), or the model trained is not the model served."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scenestream.model import train
from scenestream.model.checkpoint import Checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.model.config import ModelConfig
from scenestream.model.model import InterestModel
from scenestream.model.vocab import ItemVocab
from scenestream.stream.core.events import Event
from scenestream.stream.core.window import apply_user

SCENES = ("video", "article", "shop")
ITEMS = [f"i{n}" for n in range(30)]
SCENE_INDEX = {s: i for i, s in enumerate(SCENES)}


def _timelines(n_users, rng):
    """Time-ordered, with gaps of many sizes; one scene rare."""
    out = []
    for u in range(n_users):
        ts, tl = 1_700_000_000_000, []
        for k in range(rng.randrange(3, 60)):
            ts += rng.choice((0, 1, 1_000, 60_000, 86_400_000))
            tl.append(Event(f"e{u}-{k:02d}", f"u{u}", ITEMS[rng.randrange(30)],
                            rng.choices(SCENES, (0.6, 0.33, 0.07))[0], "view", ts))
        out.append(tl)
    return out


def _model(vocab, scene_layers=0):
    torch.manual_seed(0)
    return InterestModel(ModelConfig(n_items=len(vocab), n_scenes=3, n_actions=1, d_model=16, n_heads=2,
                                     n_layers=2, span=4, dropout=0.0, scene_layers=scene_layers)).eval()


def test_padding_a_batch_changes_nothing_but_rounding(monkeypatch):
    rng = random.Random(5)
    vocab = ItemVocab(ITEMS, [SCENES[n % 3] for n in range(30)])
    segments = [train._segment(tl, vocab, SCENE_INDEX, {"view": 0}, 32) for tl in _timelines(6, rng)]
    model = _model(vocab)
    scene_items, scene_pos = train.scene_catalog(np.arange(30) % 3, 3)
    losses = []
    for pad_to in (1, 32):
        monkeypatch.setattr(train, "PAD_TO", pad_to)
        batch = train._collate(segments)
        losses.append(max(g[0].shape[1] for _, g, seg in batch[0] if seg is None))
        with torch.no_grad():
            losses.append(train._loss(model, batch, scene_items, scene_pos, 0.0, torch.Generator()).item())
    (w1, a), (w32, b) = losses[:2], losses[2:]
    assert w32 % 32 == 0 and w32 > w1
    assert np.isfinite(a) and abs(a - b) < 1e-5


@pytest.mark.parametrize("scene_layers", [0, 1, 3])
def test_training_reads_the_context_serving_reads(scene_layers):
    """For every target, `recent` and every h_s that training reads equal what InterestEncoder computes from the
    user's state just before the target (window >= receptive field: then where a window starts changes nothing),
    with scene windows sharing the timeline's blocks or going through a stack of their own, shallower or deeper.
    Fails on an off-by-one in positions, gaps, sequences, scene contexts or a window sent through the wrong stack."""
    rng = random.Random(11)
    vocab = ItemVocab(ITEMS, [SCENES[n % 3] for n in range(30)])
    model = _model(vocab, scene_layers)
    window = model.cfg.receptive_field
    enc = InterestEncoder(Checkpoint(model, vocab, SCENES, ("view",), window, "t"), cache_mb=0)
    checked = 0
    for tl in _timelines(12, rng):
        seg = train._segment(tl, vocab, SCENE_INDEX, {"view": 0}, model.cfg.gap_buckets)
        groups, ctx, recent_at, _, _ = train._collate([seg])
        with torch.no_grad():
            out, ctx, recent_at = train._encode(model, groups, ctx, recent_at)
        for m, k in enumerate(seg.target):
            vec = enc.interests({"u": apply_user({}, tl[:k], window)[0]})
            np.testing.assert_allclose(out[recent_at[m]].numpy(), vec.recent[0], atol=1e-5)
            for s in range(3):
                assert (ctx[m, s] >= 0) == bool(vec.has[0, s])
                if ctx[m, s] >= 0:
                    np.testing.assert_allclose(out[ctx[m, s]].numpy(), vec.h[0, s], atol=1e-5)
                    checked += 1
    assert checked > 200


def test_in_scene_terms_rank_each_row_against_its_scene_only():
    """Each part's mean CE over the items of the row's own scene, written out with a masked full softmax. Some rows'
    items are of another scene than the row's (one item seen in two scenes of a log): they have no in-scene term.
    Before, such a row was scored against whichever item of its scene held the item's position in its own scene,
    or failed with a target out of bounds."""
    gen = torch.Generator().manual_seed(3)
    n_items, S, d = 40, 4, 8
    of_scene = torch.randint(0, S, (n_items,), generator=gen)
    of_scene[:S] = torch.arange(S)                                   # every scene has items
    scene_items, scene_pos = train.scene_catalog(of_scene.numpy(), S)
    E = torch.randn(n_items, d, generator=gen)
    parts, want = [], 0.0
    for m in (13, 5):
        V = torch.randn(m, d, generator=gen)
        target = torch.randint(0, n_items, (m,), generator=gen)
        scene = of_scene[target].clone()
        scene[:2] = (scene[:2] + 1) % S                              # two rows whose items are another scene's
        own = of_scene[target] == scene
        logits = (V @ E.T).masked_fill(of_scene[None] != scene[:, None], float("-inf"))
        want += F.cross_entropy(logits[own], target[own]).item()
        parts.append((V, scene, target))
    got = train._in_scene_ce(parts, E, scene_items, scene_pos).item()
    assert abs(got - want) < 1e-5 and want > 0


def test_fusion_of_chosen_targets_equals_those_rows_of_all():
    """Training fuses only the rows it reads (the global vector and the target scene's H_j), each with its own
    mask: they must be those rows of the full fusion, weights too."""
    gen = torch.Generator().manual_seed(7)
    model = _model(ItemVocab(ITEMS, [SCENES[n % 3] for n in range(30)]))
    N, S, d = 50, 3, model.cfg.d_model
    h, recent = torch.randn(N, S, d, generator=gen), torch.randn(N, d, generator=gen)
    has = torch.rand(N, S + 1, S, generator=gen) < 0.6
    has[:, :, 0] |= ~has.any(2)                                        # every row reads some scene
    targets = torch.stack([torch.full((N,), S), torch.randint(0, S, (N,), generator=gen)], 1)
    rows = torch.arange(N)[:, None]
    with torch.no_grad():
        H_all, a_all = model.fusion(h, has, recent)
        H, a = model.fusion(h, has[rows, targets], recent, targets)
    assert H.shape == (N, 2, d)
    torch.testing.assert_close(H, H_all[rows, targets], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a, a_all[rows, targets], atol=1e-6, rtol=1e-5)



def _encode_everything(model, groups, ctx, recent_at):
    """The reference for train._encode: every position of every group through every block in full, then the read
    ones picked out."""
    flat = torch.cat([model.encoder(*g, scene=kind, segment=seg).reshape(-1, model.cfg.d_model)
                      for kind, g, seg in groups])
    return flat, ctx, recent_at


@pytest.mark.parametrize("scene_layers", [0, 1, 3])
def test_read_positions_alone_encode_as_every_position(scene_layers):
    """A stack's last block computes queries and attention from the first column read, keys and values from `span`
    before it, projection, residual and MLP at the read positions alone: the outputs must be those of the full
    encoding at exactly those positions, for packed and unpacked rows, for the read positions training picks and for
    random ones (scattered, all late in the row, none in a row), through the timeline's stack and the scenes'."""
    rng = random.Random(2)
    gen = torch.Generator().manual_seed(2)
    vocab = ItemVocab(ITEMS, [SCENES[n % 3] for n in range(30)])
    model = _model(vocab, scene_layers)
    segments = [train._segment(tl, vocab, SCENE_INDEX, {"view": 0}, model.cfg.gap_buckets, skip=min(len(tl) - 1, 9))
                for tl in _timelines(16, rng)]
    groups, ctx, recent_at, _, _ = train._collate(segments)
    assert any(seg is not None for _, _, seg in groups) and any(seg is None for _, _, seg in groups)
    with torch.no_grad():
        out, row_ctx, row_recent = train._encode(model, groups, ctx, recent_at)
        flat, _, _ = _encode_everything(model, groups, ctx, recent_at)
        torch.testing.assert_close(out[row_recent], flat[recent_at], atol=1e-5, rtol=1e-4)
        has = ctx >= 0
        assert torch.equal(row_ctx >= 0, has)
        torch.testing.assert_close(out[row_ctx[has]], flat[ctx[has]], atol=1e-5, rtol=1e-4)
        for kind, g, seg in groups:
            full = model.encoder(*g, scene=kind, segment=seg)
            for p in (0.05, 0.5, 1.0):
                read = (torch.rand(g[0].shape, generator=gen) < p) & g[4]
                read[0] = False                                   # a row without any read position
                read[:, : g[0].shape[1] // 2] &= p < 1             # or all of them late in the row
                got = model.encoder(*g, scene=kind, segment=seg, read=read)
                assert got.shape == (int(read.sum()), model.cfg.d_model)
                torch.testing.assert_close(got, full[read], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scenes", [3, 1])
def test_loss_and_gradients_equal_those_of_the_full_encoding(monkeypatch, scenes):
    """The training loss through the read-positions shortcut, and its gradient for every weight, equal those of the
    full encoding (every position through every block), with one scene and with three."""
    rng = random.Random(4)
    names = SCENES if scenes == 3 else ("video",)
    vocab = ItemVocab(ITEMS, [names[n % scenes] for n in range(30)])
    torch.manual_seed(0)
    model = InterestModel(ModelConfig(n_items=len(vocab), n_scenes=scenes, n_actions=1, d_model=16, n_heads=2,
                                      n_layers=2, span=4, dropout=0.0, scene_layers=1)).train()
    tls = [[Event(e.event_id, e.user_id, e.item_id, names[0], e.action, e.ts) for e in tl] if scenes == 1 else tl
           for tl in _timelines(10, rng)]
    segments = [train._segment(tl, vocab, {s: i for i, s in enumerate(names)}, {"view": 0}, model.cfg.gap_buckets)
                for tl in tls]
    scene_items, scene_pos = train.scene_catalog(np.arange(30) % scenes, scenes) if scenes > 1 else (None, None)
    batch = train._collate(segments)
    results = []
    for encode in (train._encode, _encode_everything):
        monkeypatch.setattr(train, "_encode", encode)
        model.zero_grad()
        loss = train._loss(model, batch, scene_items, scene_pos, 0.5, torch.Generator().manual_seed(1))
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.isfinite(a) and abs(a - b) < 1e-5
    assert ga.keys() == gb.keys() and "encoder.blocks.1.attn.rel_bias" in ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=1e-4, msg=k)
