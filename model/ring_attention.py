"""One new position per window against its cached rows, in one pass of C: live traffic's extension.

Fresh traffic brings one event per window to a micro-batch, so each layer's attention is a query against at most
`span` cached rows of its own window. In torch that is a gather of every window's rows ([B, span, C], copied), two
batched matmuls of a [H, C] by a [C, span] per window (MKL's cost per window, not the math, sets their time), a mask
built from positions, a softmax: ~1 ms a layer for 300 windows, three times the math. Here each window reads its
rows where they lie in the cache's ring, scores them, softmaxes and mixes them in one loop, and nothing else is
formed. The math is LocalSelfAttention._extend's for T = 1 (model.py), the rows in the order Pool.past reads them
(model/slot_encoder.py): ring slot (head - 1 - i) mod span holds the window's i-th newest cached row, at offset 1 + i
from the new position, valid for i < count.

Compiled with the system's C compiler ($CC, default cc) the first time it is asked for, into the cache's kernels/
($SCENESTREAM_CACHE, default ~/.cache/scenestream: the layout of stream/datasets/cache.py, which this leaf may not
import), keyed by the source and the flags. Where there is no compiler, on a GPU, for any
dtype but float32, or with SCENESTREAM_RING_KERNEL=off, `ring_kernel()` is None and the torch path runs: the same
numbers within float rounding (tests/test_slot_encoder.py runs both).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float dot(const float *a, const float *b, int64_t C) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 8), _mm256_loadu_ps(b + c + 8), acc1);
    }
    for (; c + 8 <= C; c += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; c < C; c++) s += a[c] * b[c];
    return s;
}
static inline void axpy(float w, const float *r, float *o, int64_t C) {
    const __m256 wv = _mm256_set1_ps(w);
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) _mm256_storeu_ps(o + c, _mm256_fmadd_ps(wv, _mm256_loadu_ps(r + c), _mm256_loadu_ps(o + c)));
    for (; c < C; c++) o[c] += w * r[c];
}
#else
static inline float dot(const float *a, const float *b, int64_t C) {
    float s = 0.f;
    for (int64_t c = 0; c < C; c++) s += a[c] * b[c];
    return s;
}
static inline void axpy(float w, const float *r, float *o, int64_t C) {
    for (int64_t c = 0; c < C; c++) o[c] += w * r[c];
}
#endif

/* out[b, h] = softmax over {the new row, the window's cached rows} of (qk[b, h] . row + bias[offset, h]), mixing the
   rows. qk [B, H, C]; x [B, C] the new rows; ring [entries, span, C]; bias [span + 2, H], row o the bias of offset o.
   Not built with -ffast-math: gcc 12 then links code that flushes denormals to zero in the whole process. */
void attend_one(int64_t B, int64_t H, int64_t C, int64_t span, const float *qk, const float *x, const float *ring,
                const int64_t *entry, const int64_t *head, const int64_t *count, const float *bias, float *out)
{
    float p[1025];
    const float *rows[1025];
    for (int64_t b = 0; b < B; b++) {
        const int64_t e = entry[b], n = e >= 0 ? count[b] : 0;
        rows[0] = x + b * C;                  /* the new row, offset 0, then the i-th newest cached, offset 1 + i */
        const float *base = ring + e * span * C;
        for (int64_t i = 0, r = head[b] - 1; i < n; i++, r--)   /* ring slots newest first, wrapping round */
            rows[i + 1] = base + (r >= 0 ? r : r + span) * C;
        for (int64_t h = 0; h < H; h++) {
            const float *q = qk + (b * H + h) * C;
            float *o = out + (b * H + h) * C;
            float top = -INFINITY, z = 0.f;
            for (int64_t i = 0; i <= n; i++) {
                p[i] = dot(q, rows[i], C) + bias[i * H + h];
                top = p[i] > top ? p[i] : top;
            }
            #pragma omp simd reduction(+:z)
            for (int64_t i = 0; i <= n; i++) { p[i] = expf(p[i] - top); z += p[i]; }
            const float inv = 1.f / z;
            for (int64_t c = 0; c < C; c++) o[c] = 0.f;
            for (int64_t i = 0; i <= n; i++) axpy(p[i] * inv, rows[i], o, C);
        }
    }
}
"""
KERNEL_ENV = "SCENESTREAM_RING_KERNEL"   # "off": the torch path always
MAX_SPAN = 1024   # the C's arrays on the stack hold span + 1 rows


@dataclass
class Ring:
    """One layer's cached rows of a batch of windows, where they lie: rows [entries, span, C] (the cache's tensor
    for the layer), and per window its entry (-1: none), ring head and valid rows."""
    rows: torch.Tensor
    entry: np.ndarray
    head: np.ndarray
    count: np.ndarray


def _flags() -> list[str]:
    """-O3 and sums over vectors, with AVX2 and FMA where torch finds them (not -march=native: the cached library may
    outlive the machine it was built on)."""
    simd = ["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
    return ["-O3", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared", *simd]


@lru_cache(maxsize=1)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get(KERNEL_ENV, "auto") == "off":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler: the ring attention runs in torch")
        return None
    flags = _flags()
    tag = hashlib.sha256((SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    root = os.environ.get("SCENESTREAM_CACHE")
    cache = (Path(root).expanduser() if root else Path.home() / ".cache" / "scenestream") / "kernels"
    path = cache / f"ring_attention-{tag}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:   # built aside, then moved: processes may race
                src, lib = Path(tmp) / "ring.c", Path(tmp) / "ring.so"
                src.write_text(SOURCE)
                subprocess.run([compiler, *flags, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True,
                               timeout=120)
                os.replace(lib, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the ring attention kernel did not build (%s): it runs in torch", exc)
        return None
    fn = lib.attend_one
    fn.restype = None
    fn.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 8
    return lib


def ring_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `attend_one` runs for tensors of this device and dtype (else the caller gathers the rows)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _library() is not None


def attend_one(qk: torch.Tensor, x: torch.Tensor, ring: Ring, bias: torch.Tensor) -> torch.Tensor:
    """qk [B, H, C] (each head's query in row space), x [B, C] (the new rows), bias [span + 2, H] -> [B, H, C]: each
    head's softmax-weighted mix of the new row and the window's cached rows."""
    B, H, C = qk.shape
    span = ring.rows.shape[1]
    assert span + 1 <= MAX_SPAN and ring.rows.is_contiguous() and ring.rows.dtype == torch.float32
    qk, x, bias = qk.contiguous(), x.contiguous(), bias.contiguous()
    entry, head, count = (np.ascontiguousarray(a, np.int64) for a in (ring.entry, ring.head, ring.count))
    out = torch.empty(B, H, C)
    _library().attend_one(B, H, C, span, qk.data_ptr(), x.data_ptr(), ring.rows.data_ptr(),
                          entry.ctypes.data, head.ctypes.data, count.ctypes.data, bias.data_ptr(), out.data_ptr())
    return out
