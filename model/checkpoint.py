"""Checkpoints: safetensors weights + JSON config + JSON item vocabulary. Loading never unpickles anything.

The model version is a content hash of the weights file, so a record, an index or a cached vector can always say
which weights produced it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import InterestModel, ModelConfig
from .vocab import ItemVocab

WEIGHTS, CONFIG, ITEMS = "model.safetensors", "config.json", "items.json"
FORMAT = 1


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
            raise CheckpointError(f"checkpoint {path} is missing {name}")
    try:
        config = json.loads((path / CONFIG).read_text())
        vocab = ItemVocab.from_json(json.loads((path / ITEMS).read_text()))
        cfg = ModelConfig(**config["model"])
        scenes, actions = tuple(config["scenes"]), tuple(config["actions"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {CONFIG} or {ITEMS}: {exc}") from exc
    if config.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {config.get('format')}, this build reads {FORMAT}")
    if cfg.n_items != len(vocab) or cfg.n_scenes != len(scenes) or cfg.n_actions != len(actions):
        raise CheckpointError(f"checkpoint {path}: config does not match its vocabulary, scenes or actions")
    version = _version(path / WEIGHTS)
    if config.get("version") not in (None, version):
        raise CheckpointError(f"checkpoint {path}: weights changed since it was written "
                              f"(config says {config['version']}, file hashes to {version})")
    model = InterestModel(cfg)
    try:
        state = load_file(str(path / WEIGHTS))
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {path}: weights do not load into the configured model: {exc}") from exc
    model.to(device).eval()
    return Checkpoint(model, vocab, scenes, actions, int(config["window"]), version, config.get("meta", {}))
