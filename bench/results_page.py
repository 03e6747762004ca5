"""The headline tables of BENCHMARKS.md and README.md, generated from bench/results.json (the one source of every
headline figure: its value, date and command). tests/test_layout.py checks that both pages hold what this renders.

    python bench/results_page.py          # rewrite both tables after editing bench/results.json
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
BEGIN, END = "<!-- headline:begin (bench/results_page.py writes this table) -->", "<!-- headline:end -->"
PAGES = {"BENCHMARKS.md": "page", "README.md": "readme"}


def load(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text())


def render(results: dict, kind: str) -> str:
    """The table between the markers: every figure (`page`), or the few the README shows (`readme`)."""
    figures = results["figures"]
    if kind == "readme":
        rows = ["| | | measured |", "|---|---:|---|"]
        rows += [f"| {f['readme']} | **{f['readme_value']}** | {f['date']} |" for f in figures if f.get("readme")]
    else:
        rows = ["| area | figure | value | date | command |", "|---|---|---|---|---|"]
        rows += [f"| {f['area']} | {f['figure']} | **{f['value']}** | {f['date']} | `{f['command']}` |"
                 if not f["command"].startswith("sources") else
                 f"| {f['area']} | {f['figure']} | **{f['value']}** | {f['date']} | {f['command']} |"
                 for f in figures]
        rows += ["", f"Machine: {results['machine']}."]
    return "\n".join([BEGIN, *rows, END])


def block(text: str) -> str:
    """The generated table a page holds now ('' when it has none)."""
    m = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), text, flags=re.S)
    return m.group(0) if m else ""


def write(results: dict, root: Path = ROOT) -> None:
    for name, kind in PAGES.items():
        path = root / name
        text = path.read_text()
        if not block(text):
            raise SystemExit(f"{name} has no {BEGIN} ... {END} block to write into")
        path.write_text(text.replace(block(text), render(results, kind)))


if __name__ == "__main__":
    write(load())
    print("wrote the headline tables of " + " and ".join(PAGES))
