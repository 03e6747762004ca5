"""The C kernel for one new position a window (model/ring_attention.py) against the torch extension it stands in
for: the same attention outputs from the rows where the cache's ring holds them as from the rows gathered, for
rings at every head and fill, windows with no entry, and more heads and widths than the default model's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scenestream.model.config import ModelConfig
from scenestream.model.model import LocalSelfAttention
from scenestream.model.ring_attention import ring_kernel
from scenestream.model.slot_encoder import Pool

pytestmark = pytest.mark.skipif(not ring_kernel("cpu", torch.float32), reason="no C compiler: the torch path runs")


@pytest.mark.parametrize("d_model,n_heads,span", [(64, 2, 24), (32, 4, 5), (12, 3, 1), (16, 8, 3)])
def test_the_kernel_attends_as_the_gathered_rows_do(d_model, n_heads, span):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig(n_items=10, n_scenes=3, n_actions=4, d_model=d_model, n_heads=n_heads, n_layers=1, span=span)
    attn = LocalSelfAttention(cfg).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    capacity, B = 40, 200
    pool = Pool(cfg, layers=1, window=50, capacity=capacity, device=torch.device("cpu"))
    pool.rows.normal_()
    pool.head[:] = rng.integers(0, span, capacity)
    pool.ring[:] = rng.integers(0, span + 1, capacity)          # empty to full
    entries = rng.integers(-1, capacity, B)                     # -1: a window with no entry
    x = torch.randn(B, 1, d_model)
    valid = torch.ones(B, 1, dtype=torch.bool)
    new_pos = torch.zeros(B, 1, dtype=torch.long)
    with torch.inference_mode():
        want, _ = attn(x, valid, 1, pool.past(entries, new_pos)[0])
        got, _ = attn(x, valid, 1, pool.rings(entries)[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)   # float32 sums in another order


def test_the_kernel_leaves_the_process_floats_alone():
    """Built with -ffast-math, gcc 12 links code that sets the CPU to flush denormals to zero in every thread of the
    process the library is loaded into: torch's results would change everywhere."""
    assert ring_kernel("cpu", torch.float32)
    assert torch.tensor([1e-40]).item() * 1.0 > 0
    assert (torch.tensor([1e-40]) * 1.0).item() > 0
