"""Training's batches: rounding a batch's width up (model/train.py, PAD_TO) keeps the allocator's block sizes few;
it must not change what is trained: the loss of a batch is the same at any padding, within float rounding."""
import random

import torch

from scenestream.model import train
from scenestream.model.model import InterestModel, ModelConfig
from scenestream.model.vocab import ItemVocab
from scenestream.stream.core.events import Event

SCENES = ("video", "article")
ITEMS = [f"i{n}" for n in range(20)]


def _batch(pad_to, monkeypatch, examples):
    monkeypatch.setattr(train, "PAD_TO", pad_to)
    return train._collate(examples, len(SCENES), 32)


def test_padding_a_batch_changes_nothing_but_rounding(monkeypatch):
    rng = random.Random(5)
    vocab = ItemVocab(ITEMS, [SCENES[n % 2] for n in range(20)])
    examples = []
    for u in range(6):
        tl = [Event(f"e{u}-{k}", f"u{u}", ITEMS[rng.randrange(20)], SCENES[rng.randrange(2)], "view",
                    1_700_000_000_000 + 60_000 * k) for k in range(rng.randrange(3, 40))]
        examples.append(train._example(tl, vocab, {s: i for i, s in enumerate(SCENES)}, {"view": 0}))
    torch.manual_seed(0)
    model = InterestModel(ModelConfig(n_items=len(vocab), n_scenes=2, n_actions=1, d_model=16, n_heads=2,
                                      n_layers=2, span=4, dropout=0.0)).eval()
    tight, padded = _batch(1, monkeypatch, examples), _batch(32, monkeypatch, examples)
    assert padded[0][0].shape[1] % 32 == 0 and padded[0][0].shape[1] > tight[0][0].shape[1]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a = train._loss(model, tight, None, 0.0, gen)
        b = train._loss(model, padded, None, 0.0, gen)
    assert torch.isfinite(a) and abs(a.item() - b.item()) < 1e-5
