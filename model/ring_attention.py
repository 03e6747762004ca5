"""The streaming encoder's attention in one pass of C: each window's new positions against themselves and the rows
its cache entry holds, read where they lie.

A micro-batch extends each window by a few positions (live traffic: one), so each layer's attention is a handful of
queries against at most `span` rows of their own window. In torch that is a gather of every window's cached rows
([B, span, C], copied), two batched matmuls of a few rows by a [C, span + T] per window (MKL's cost per window, not
the math, sets their time), a mask built from positions, a softmax: for an event a window ~1 ms a layer for 300
windows, three times the math. Here each query reads its rows in place, scores them for every head, softmaxes and
mixes them, and nothing else is formed. The math is LocalSelfAttention._extend's (model.py), the rows as Pool.past
reads them (model/slot_encoder.py): ring slot (head - 1 - i) mod span holds the window's i-th newest cached row, at
position -1 - i (the first new one is 0), valid for i < count; a query at position p sees offsets 0 .. span.
Padding columns (left of a window's new ones) see themselves alone: their outputs are never read.

Compiled with the system's C compiler ($CC, default cc) the first time it is asked for, into the cache's kernels/
($SCENESTREAM_CACHE, default ~/.cache/scenestream: the layout of stream/datasets/cache.py, which this leaf may not
import), keyed by the source and the flags. Where there is no compiler, on a GPU, for any
dtype but float32, or with SCENESTREAM_RING_KERNEL=off, `ring_kernel()` is False and the torch path runs: the same
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
#define VEC 8
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* One window: scores of its rows[0..n] (the new row, then the cached ones newest first) for every head, softmax,
   mix. H is a constant where the caller's switch makes it one, so the heads' sums stay in registers. */
static inline __attribute__((always_inline)) void window(const int64_t H, const int64_t C, const int64_t n,
        const float *const *rows, const int64_t *off, const float *q, const float *bias, float *out, float *p)
{
    for (int64_t i = 0; i <= n; i++) {          /* p[i * H + h]: every head's score of row i, the row read once */
        const float *r = rows[i];
#if defined(__AVX2__) && defined(__FMA__)
        if (C % VEC == 0 && H <= 4) {
            __m256 acc[4];
            for (int64_t h = 0; h < H; h++) acc[h] = _mm256_setzero_ps();
            for (int64_t c = 0; c < C; c += VEC) {
                const __m256 rv = _mm256_loadu_ps(r + c);
                for (int64_t h = 0; h < H; h++) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * C + c), rv, acc[h]);
            }
            for (int64_t h = 0; h < H; h++) p[i * H + h] = hsum(acc[h]) + bias[off[i] * H + h];
            continue;
        }
#endif
        for (int64_t h = 0; h < H; h++) {
            float s = 0.f;
            for (int64_t c = 0; c < C; c++) s += q[h * C + c] * r[c];
            p[i * H + h] = s + bias[off[i] * H + h];
        }
    }
    for (int64_t h = 0; h < H; h++) {           /* softmax per head, in place */
        float top = p[h], z = 0.f;
        for (int64_t i = 1; i <= n; i++) top = p[i * H + h] > top ? p[i * H + h] : top;
        for (int64_t i = 0; i <= n; i++) { p[i * H + h] = expf(p[i * H + h] - top); z += p[i * H + h]; }
        const float inv = 1.f / z;
        for (int64_t i = 0; i <= n; i++) p[i * H + h] *= inv;
    }
#if defined(__AVX2__) && defined(__FMA__)
    if (C % (2 * VEC) == 0 && H <= 4) {         /* the mix: 2 x H running sums in registers over the rows */
        for (int64_t c = 0; c < C; c += 2 * VEC) {
            __m256 lo[4], hi[4];
            for (int64_t h = 0; h < H; h++) lo[h] = hi[h] = _mm256_setzero_ps();
            for (int64_t i = 0; i <= n; i++) {
                const __m256 a = _mm256_loadu_ps(rows[i] + c), b = _mm256_loadu_ps(rows[i] + c + VEC);
                for (int64_t h = 0; h < H; h++) {
                    const __m256 w = _mm256_set1_ps(p[i * H + h]);
                    lo[h] = _mm256_fmadd_ps(w, a, lo[h]);
                    hi[h] = _mm256_fmadd_ps(w, b, hi[h]);
                }
            }
            for (int64_t h = 0; h < H; h++) {
                _mm256_storeu_ps(out + h * C + c, lo[h]);
                _mm256_storeu_ps(out + h * C + c + VEC, hi[h]);
            }
        }
        return;
    }
#endif
    for (int64_t h = 0; h < H; h++)
        for (int64_t c = 0; c < C; c++) {
            float s = 0.f;
            for (int64_t i = 0; i <= n; i++) s += p[i * H + h] * rows[i][c];
            out[h * C + c] = s;
        }
}

/* out[b, j, h]: query column T - Tq + j of window b, softmax over the keys it may see of (qk[b, j, h] . row +
   bias[offset, h]), mixing those rows: itself and the new rows before it (x [B, T, C], window b's fresh[b] newest
   columns valid) and its cached rows (ring [entries, span, C]), at most `span` back; bias [span + 2, H], row o the
   bias of offset o. Not built with -ffast-math: gcc 12 then links code that flushes denormals to zero in the whole
   process. */
void attend(int64_t B, int64_t T, int64_t Tq, int64_t H, int64_t C, int64_t span, const float *qk, const float *x,
            const int64_t *fresh, const float *ring, const int64_t *entry, const int64_t *head, const int64_t *count,
            const float *bias, float *out)
{
    float p[8 * 1025];
    const float *rows[1025];
    int64_t off[1025];
    for (int64_t b = 0; b < B; b++) {
        const int64_t e = entry[b], cached = e >= 0 ? count[b] : 0, first = T - fresh[b];
        const float *base = ring + (e >= 0 ? e : 0) * span * C, *xb = x + b * T * C;
        if (b + 1 < B && entry[b + 1] >= 0) {      /* the next window's rows on their way to the cache */
            const char *next = (const char *)(ring + entry[b + 1] * span * C);
            for (int64_t k = 0; k < span * C * 4; k += 64) __builtin_prefetch(next + k);
        }
        for (int64_t j = 0; j < Tq; j++) {
            const int64_t t = T - Tq + j, pos = t - first;   /* the query's column; its position (< 0: padding) */
            int64_t n = 0;
            for (int64_t u = t; u >= first && u >= t - span; u--, n++) {   /* itself and the new rows before it */
                rows[n] = xb + u * C;
                off[n] = t - u;
            }
            if (pos < 0) {                          /* padding: itself alone (never read) */
                rows[0] = xb + t * C; off[0] = 0; n = 1;
            }
            for (int64_t i = 0, r = head[b] - 1; pos >= 0 && i < cached && pos + 1 + i <= span; i++, r--) {
                rows[n] = base + (r >= 0 ? r : r + span) * C;   /* the i-th newest cached row */
                off[n++] = pos + 1 + i;
            }
            const float *q = qk + (b * Tq + j) * H * C;
            float *o = out + (b * Tq + j) * H * C;
            switch (H) {                             /* constants: the heads' sums in registers */
                case 1: window(1, C, n - 1, rows, off, q, bias, o, p); break;
                case 2: window(2, C, n - 1, rows, off, q, bias, o, p); break;
                case 4: window(4, C, n - 1, rows, off, q, bias, o, p); break;
                default: window(H, C, n - 1, rows, off, q, bias, o, p);
            }
        }
    }
}
"""
KERNEL_ENV = "SCENESTREAM_RING_KERNEL"   # "off": the torch path always
MAX_SPAN = 1024   # the C's arrays on the stack hold span + 1 rows, of up to 8 heads


@dataclass
class Ring:
    """One layer's cached rows of a batch of windows, where they lie: rows [entries, span, C] (the cache's tensor
    for the layer), and per window its entry (-1: none), ring head and valid rows; and how many of its newest
    positions are new (right-aligned: the rest of a batch's columns are padding)."""
    rows: torch.Tensor
    entry: np.ndarray
    head: np.ndarray
    count: np.ndarray
    fresh: np.ndarray


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
    fn = lib.attend
    fn.restype = None
    fn.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 9
    return lib


def ring_kernel(device: torch.device, dtype: torch.dtype, heads: int = 1, span: int = 1) -> bool:
    """Whether `attend` runs for a model of these on this device (else the caller gathers the rows)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and heads <= 8 and span < MAX_SPAN and \
        _library() is not None


def attend(qk: torch.Tensor, x: torch.Tensor, ring: Ring, bias: torch.Tensor) -> torch.Tensor:
    """qk [B, Tq, H, C] (each head's query in row space, for the last Tq columns), x [B, T, C] (the new rows), bias
    [span + 2, H] -> [B, Tq, H, C]: each head's softmax-weighted mix of the rows each query may see."""
    B, Tq, H, C = qk.shape
    T, span = x.shape[1], ring.rows.shape[1]
    assert span < MAX_SPAN and H <= 8 and ring.rows.is_contiguous() and ring.rows.dtype == torch.float32
    qk, x, bias = qk.contiguous(), x.contiguous(), bias.contiguous()
    # a layer above the first holds the newest columns alone
    fresh, entry, head, count = (np.ascontiguousarray(a, np.int64) for a in
                                 (np.minimum(ring.fresh, T), ring.entry, ring.head, ring.count))
    out = torch.empty(B, Tq, H, C)
    _library().attend(B, T, Tq, H, C, span, qk.data_ptr(), x.data_ptr(), fresh.ctypes.data, ring.rows.data_ptr(),
                      entry.ctypes.data, head.ctypes.data, count.ctypes.data, bias.data_ptr(), out.data_ptr())
    return out
