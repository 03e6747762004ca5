"""Fuzz: generated hostile payloads through the event decoder (`decode`) and the catalog record
parser (`decode_update`). No exception escapes, no payload reaches a decoder's own-bug reason (`decoder_error`),
and the few unmutated payloads are accepted. Payloads: tests/fuzz_payloads.py (seeded structured mutations).

The suite runs EXAMPLES event payloads and a tenth as many catalog records (about 5 s here); set
SCENESTREAM_FUZZ_EXAMPLES to run more. `python bench/fuzz.py` runs the full 100,000 + 10,000 (BENCHMARKS.md).
"""
from __future__ import annotations

import os

from scenestream.stream.live.catalog import CATALOG_REASONS, decode_update
from scenestream.stream.core.config import StreamConfig
from scenestream.stream.core.events import REASONS, decode

from .fuzz_payloads import BYTE_MUTATIONS, FIELD_MUTATIONS, catalog_payloads, event_payloads, fuzz

EXAMPLES = int(os.environ.get("SCENESTREAM_FUZZ_EXAMPLES", "20000"))
CFG = StreamConfig()
DIM = 16


def check(summary: dict, reasons) -> None:
    assert (summary["exceptions"], summary["decoder_errors"], summary["valid_refused"]) == (0, 0, 0), summary
    assert set(summary["outcomes"]) <= {"accepted", *reasons}, summary["outcomes"]
    assert set(summary["by_kind"]) >= {"valid", *FIELD_MUTATIONS, *BYTE_MUTATIONS}, summary["by_kind"]


def test_event_decoder_fuzz():
    summary = fuzz(lambda raw: decode(raw, CFG), event_payloads(EXAMPLES))
    check(summary, REASONS)
    assert summary["payloads"] == EXAMPLES and len(summary["outcomes"]) >= 12, summary


def test_catalog_parser_fuzz():
    summary = fuzz(lambda raw: decode_update(raw, CFG, DIM), catalog_payloads(max(EXAMPLES // 10, 1000), DIM))
    check(summary, CATALOG_REASONS)
    assert {"vector_wrong_dim", "vector_non_finite", "vector_junk_element", "vector_huge_vector"} <= \
        set(summary["by_kind"]), summary["by_kind"]
    assert set(summary["outcomes"]) >= {"accepted", "oversized", "wrong_dim", "non_finite", "wrong_type"}, summary
