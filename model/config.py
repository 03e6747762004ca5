"""The model's and training's settings, and the defaults per data set: plain data, so that `scenestream train
--help` shows them without loading torch. Every default lives here once: ModelConfig and TrainConfig hold the
defaults, PRESETS only what a data set changes, and `preset` is what `train` uses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

ENCODER_CACHE_MB = 256   # the streaming encoder's cache (model/slot_encoder.py): at d=64, span 24, ~6 KB a scene
                         # window and ~12 KB a merged timeline; split S scene windows to one timeline (with three
                         # scenes, every window of ~8,400 users)


def receptive_field(n_layers: int, span: int) -> int:
    """Events the last position depends on: n_layers hops of `span` back, plus the event whose timestamp gives the
    oldest one its time gap, plus the last event itself."""
    return n_layers * span + 2


@dataclass(frozen=True)
class ModelConfig:
    n_items: int                  # vocabulary size including PAD and OOV
    n_scenes: int
    n_actions: int
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    span: int = 24                # attention look-back per layer
    gap_buckets: int = 32         # log2-second buckets of the time since the previous event in the window
    dropout: float = 0.2
    scene_layers: int = 1         # blocks of the per-scene windows' own stack; 0: they share the timeline's blocks

    @property
    def receptive_field(self) -> int:
        """Of the deeper stack: what a window must hold for every vector to see all the model would."""
        return receptive_field(max(self.layers(False), self.layers(True)), self.span)

    @property
    def own_scene_stack(self) -> bool:
        """Per-scene windows go through blocks of their own (with one scene there are none: h_s is `recent`)."""
        return self.scene_layers > 0 and self.n_scenes > 1

    def layers(self, scene: bool) -> int:
        """Blocks a window goes through: a scene window's stack, or the merged timeline's."""
        return self.scene_layers if scene and self.own_scene_stack else self.n_layers

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_users: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_events: int = 1000      # newest events per user used for training
    segment: int = 32           # targets per training segment: long users are cut so attention stays short
    scene_dropout: float = 0.25
    warmup_steps: int = 100     # linear warm-up (at most 10% of all steps), then cosine decay to 0 at the last
                                # planned epoch
    patience: int = 3           # epochs without a better validation NDCG@10 before stopping
    val_users: int = 2000       # validation sample size (0 = all users)
    seed: int = 0
    threads: int = 0            # torch CPU threads (0 = torch's default)


# What each data set changes from the defaults above (picked from measurements on a 2-core CPU: BENCHMARKS.md,
# "Recommendation quality"); None is any other input (e.g. --input LOG). Keys are TrainConfig or ModelConfig fields.
PRESETS: dict[Optional[str], dict] = {
    None: {},
    "synthetic": {},
    "ml-1m": {"batch_users": 32, "segment": 64, "span": 48},
    "ml-1m-5core": {"batch_users": 32, "segment": 64, "span": 48},
    "ml-100k": {"epochs": 10, "batch_users": 32, "segment": 64, "span": 48},
}
PRESET_KEYS = ("epochs", "batch_users", "segment", "lr", "span", "scene_layers")   # what `train` takes from a preset


# How long a run of the defaults took on the 2-core development machine (BENCHMARKS.md, "Recommendation quality";
# training logs a budget for the run at hand after its first steps)
TIME_HERE: dict[Optional[str], str] = {
    "ml-1m": "genre scenes (the default) ~65-70 s an epoch, ~9-10 min for 8; one scene (--scenes single) ~45 s an "
             "epoch, ~6 min; genre NDCG@10 ~0.195, one scene ~0.192",
    "ml-1m-5core": "about as ml-1m (999,611 of its 1,000,209 ratings)",
    "ml-100k": "one scene ~1.5 min; genre scenes ~15-25 s an epoch",
}


def preset(dataset: Optional[str]) -> dict:
    """The training defaults for a named data set: TrainConfig's and ModelConfig's, with the data set's changes
    (a new dict, safe to update)."""
    defaults = {**asdict(TrainConfig()), **{f: getattr(ModelConfig, f) for f in ("span", "scene_layers")}}
    chosen = {**defaults, **PRESETS.get(dataset, PRESETS[None])}
    return {k: chosen[k] for k in PRESET_KEYS}


def presets_help() -> str:
    return "\n".join(f"  {name or 'other input'}: " + ", ".join(f"{k} {v}" for k, v in preset(name).items())
                     + (f"\n    here: {TIME_HERE[name]}" if name in TIME_HERE else "")
                     for name in PRESETS)
