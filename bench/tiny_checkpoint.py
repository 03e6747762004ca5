"""The small model the worker benchmarks serve when not given one: one epoch on 200 synthetic users, trained with
the `scenestream` commands a user runs (the worker's speed, not the model's quality, is what they measure)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint() -> str:
    ckpt = tempfile.mkdtemp()
    log = Path(ckpt) / "log.jsonl"
    cli = [sys.executable, "-m", "scenestream.stream.cli"]
    subprocess.run([*cli, "generate", "--users", "200", "--out", str(log)], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([*cli, "train", "--input", str(log), "--epochs", "1", "--out", ckpt], cwd=ROOT, check=True,
                   capture_output=True)
    return ckpt
