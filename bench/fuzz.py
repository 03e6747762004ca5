"""Fuzzing: seeded hostile payloads through the event decoder (`decode`) and the catalog record
parser (`decode_update`), counting outcomes; no exception may escape and no payload may reach `decoder_error`.

Payloads are the suite's (tests/fuzz_payloads.py): structured mutations of valid events and catalog records (wrong
types, huge numbers, unicode edge cases, missing fields, nested junk, NaN/Infinity literals, oversized, truncation,
flipped/spliced/random bytes; for the catalog also wrong-length, non-finite and huge vectors). tests/test_fuzz.py runs
a smaller count of the same.

    python bench/fuzz.py [--events 100000] [--catalog 10000] [--dim 64] [--seed 16]

Prints one JSON summary: payloads, outcomes (accepted or the rejection reason) and mutation kinds per decoder,
exceptions (0), decoder_errors (0), valid payloads refused (0), seconds. Exits 1 if any of those three is not 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/fuzz_payloads.py

from scenestream.stream.live.catalog import decode_update  # noqa: E402
from scenestream.stream.core.config import StreamConfig  # noqa: E402
from scenestream.stream.core.events import decode  # noqa: E402
from tests.fuzz_payloads import catalog_payloads, event_payloads, fuzz  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--catalog", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64, help="the catalog's vector dimension d")
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    cfg, t0 = StreamConfig(), time.perf_counter()
    result = {"events": fuzz(lambda raw: decode(raw, cfg), event_payloads(args.events, args.seed)),
              "catalog": fuzz(lambda raw: decode_update(raw, cfg, args.dim),
                              catalog_payloads(args.catalog, args.dim, args.seed))}
    result.update(seconds=round(time.perf_counter() - t0, 1), seed=args.seed, dim=args.dim,
                  machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
                  date=time.strftime("%Y-%m-%d", time.gmtime()))
    print(json.dumps(result, indent=1))
    sys.exit(int(any(r[k] for r in (result["events"], result["catalog"])
                     for k in ("exceptions", "decoder_errors", "valid_refused"))))


if __name__ == "__main__":
    main()
