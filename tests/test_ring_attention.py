"""The C kernel of the streaming encoder's attention (model/ring_attention.py) against the torch extension it stands
in for: the same outputs from the rows where the cache's ring holds them as from the rows gathered, for rings at
every head and fill, windows with no entry, one new position a window and several (padded to the batch's widest,
queries on the last few columns), and more heads and widths than the default model's."""
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
@pytest.mark.parametrize("T,tail", [(1, None), (7, None), (7, 3), (30, 25)])
def test_the_kernel_attends_as_the_gathered_rows_do(d_model, n_heads, span, T, tail):
    torch.manual_seed(0)
    rng = np.random.default_rng(T)
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
    fresh = rng.integers(1, T + 1, B)                           # new positions, right-aligned; the rest padding
    x = torch.randn(B, T, d_model)
    valid = torch.from_numpy(np.arange(T)[None] >= T - fresh[:, None])
    new_pos = torch.arange(T)[None] - torch.from_numpy(T - fresh)[:, None]
    with torch.inference_mode():
        want, _ = attn(x, valid, tail, pool.past(entries, new_pos)[0])
        got, _ = attn(x, valid, tail, pool.rings(entries, fresh)[0])
    read = valid[:, -want.shape[1]:]                            # padding's outputs are never read
    # float32 sums in another order, of outputs ~10 (random weights, unnormed rows): a wrong row or offset is ~1 off
    torch.testing.assert_close(got[read], want[read], atol=5e-5, rtol=1e-5)


def test_the_kernel_leaves_the_process_floats_alone():
    """Built with -ffast-math, gcc 12 links code that sets the CPU to flush denormals to zero in every thread of the
    process the library is loaded into: torch's results would change everywhere."""
    assert ring_kernel("cpu", torch.float32)
    assert (torch.tensor([1e-40]) * 1.0).item() > 0
