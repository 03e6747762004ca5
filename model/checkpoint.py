"""Checkpoints: safetensors weights + JSON config + JSON item vocabulary. Loading never unpickles anything.

Loading reads only those three files and checks them before use: each within a size limit (MAX_BYTES), the weights
a safetensors file (an 8-byte header length, then a JSON header) whose tensors have exactly the names, shapes and
dtypes of the configured model. A torch.save or pickle file, renamed or in place of the weights, is refused with a
message saying so; other files in the folder are never opened.

The model version is a content hash of the weights file, so a record, an index or a cached vector can always say
which weights produced it.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import InterestModel
from .vocab import ItemVocab

WEIGHTS, CONFIG, ITEMS = "model.safetensors", "config.json", "items.json"
FORMAT = 1
# Size limits, bytes: config a few KB, items ~40 bytes per item (25M items), weights 16 GiB (both far above use)
MAX_BYTES = {CONFIG: 1 << 20, ITEMS: 1 << 30, WEIGHTS: 16 << 30}
PICKLED = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")   # never loaded; named in the error when found
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or inconsistent; the message says which and why."""


@dataclass
class Checkpoint:
    model: InterestModel
    vocab: ItemVocab
    scenes: tuple[str, ...]
    actions: tuple[str, ...]
    window: int
    version: str
    meta: dict = field(default_factory=dict)  # training facts: dataset, cutoff, cutoff_ts, metrics, seconds


def _version(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def save_checkpoint(out: str | Path, model: InterestModel, vocab: ItemVocab, scenes, actions, window: int,
                    meta: dict | None = None) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    version = _version(out / WEIGHTS)
    config = {"format": FORMAT, "model": model.cfg.to_dict(), "scenes": list(scenes), "actions": list(actions),
              "window": window, "version": version, "meta": meta or {}}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out / ITEMS).write_text(json.dumps(vocab.to_json()) + "\n")
    return version


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder "
                              f"(make one with: scenestream train --out {path})")
    for name in (WEIGHTS, CONFIG, ITEMS):
        if not (path / name).is_file():
            pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLED)
            raise CheckpointError(f"checkpoint {path} is missing {name}" + (
                f"; {', '.join(pickled)} is not read: pickle-bearing files are never loaded (save the weights with "
                "safetensors: scenestream train --out)" if pickled else ""))
        if (path / name).stat().st_size > MAX_BYTES[name]:
            raise CheckpointError(f"checkpoint {path}: {name} is {(path / name).stat().st_size:,} bytes, over the "
                                  f"limit of {MAX_BYTES[name]:,}")
    header = safetensors_header(path / WEIGHTS)
    try:
        config = json.loads((path / CONFIG).read_text())
        vocab = ItemVocab.from_json(json.loads((path / ITEMS).read_text()))
        cfg = ModelConfig(**config["model"])
        scenes, actions, window = tuple(config["scenes"]), tuple(config["actions"]), int(config["window"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {CONFIG} or {ITEMS}: {exc}") from exc
    if config.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {config.get('format')}, this build reads {FORMAT}")
    if cfg.n_items != len(vocab) or cfg.n_scenes != len(scenes) or cfg.n_actions != len(actions):
        raise CheckpointError(f"checkpoint {path}: config does not match its vocabulary, scenes or actions")
    version = _version(path / WEIGHTS)
    if config.get("version") not in (None, version):
        raise CheckpointError(f"checkpoint {path}: weights changed since it was written "
                              f"(config says {config['version']}, file hashes to {version})")
    try:
        with torch.device("meta"):   # names, shapes and dtypes without allocating: a hostile config costs nothing
            want = {k: {"dtype": _DTYPES.get(v.dtype, str(v.dtype)), "shape": list(v.shape)}
                    for k, v in InterestModel(cfg).state_dict().items()}
    except Exception as exc:  # a config no model can be built from
        raise CheckpointError(f"checkpoint {path}: {CONFIG} describes no buildable model: {exc}") from exc
    got = {k: {"dtype": v.get("dtype"), "shape": v.get("shape")} for k, v in header.items() if k != "__metadata__"}
    if got != want:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS} does not match the configured model: {len(bad)} "
                              f"tensors differ in name, shape or dtype, e.g. {bad[0]!r}: file has "
                              f"{got.get(bad[0])}, model needs {want.get(bad[0])}")
    model = InterestModel(cfg)
    try:
        state = load_file(str(path / WEIGHTS))
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {path}: weights do not load into the configured model: {exc}") from exc
    model.to(device).eval()
    return Checkpoint(model, vocab, scenes, actions, window, version, config.get("meta", {}))


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, read without loading tensors; a CheckpointError for any other file
    (a torch.save zip or a pickle in particular, which are never opened with a loader that could run code)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(size) if 0 < size <= min(100 << 20, path.stat().st_size - 8) else b""
    kind = ("a zip archive (torch.save)" if head.startswith(b"PK\x03\x04") else
            "a pickle (torch.save or pickle.dump)" if head[:1] == b"\x80" else "not a safetensors file")
    try:
        header = json.loads(raw) if raw.startswith(b"{") else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is {kind}: only safetensors weights are "
                              "loaded, never pickle-bearing files")
    return header
