"""What a deployment configures about its events: scenes, actions, window length and input limits.

One frozen dataclass, so the decoder, the state, the catalog, the API and the model agree on the same vocabulary and
the same limits. Every field has a documented default; the CLI maps flags and SCENESTREAM_* environment variables
onto it (docs/configuration.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

DEFAULT_SCENES = ("video", "article", "shop")
DEFAULT_ACTIONS = ("view", "click", "like", "buy")

# 1990-01-01 .. 2100-01-01 in epoch milliseconds: admits MovieLens-100k (1997) and rejects seconds-for-ms mistakes.
TS_MIN_MS = 631_152_000_000
TS_MAX_MS = 4_102_444_800_000

# Environment-only settings (every other setting is a CLI flag with its own variable; docs/configuration.md).
# The largest record the worker writes (a changelog window, a popularity record): under Kafka's default 1 MiB limit.
MAX_RECORD_BYTES = 900_000

# The codecs a Kafka record batch may be compressed with; the worker reads all of them and writes with one.
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")

SCENES_ENV = "SCENESTREAM_SCENES"    # comma-separated scenes of event logs read with --input (default below)
ACTIONS_ENV = "SCENESTREAM_ACTIONS"  # comma-separated actions of those logs


@dataclass(frozen=True)
class StreamConfig:
    scenes: tuple[str, ...] = DEFAULT_SCENES
    actions: tuple[str, ...] = DEFAULT_ACTIONS
    default_action: str = ""          # the action of events that name none: "click" if configured, else the first
    window: int = 50  # L: events kept per (user, scene)
    max_payload_bytes: int = 4096
    max_id_chars: int = 128           # ids: at most this many characters ...
    max_id_bytes: int = 256           # ... and this many bytes of UTF-8 (so state records have a size bound)
    max_state_bytes: int = MAX_RECORD_BYTES   # a user's changelog record may not exceed this
    ts_min_ms: int = TS_MIN_MS
    ts_max_ms: int = TS_MAX_MS
    _scene_set: frozenset = field(init=False, repr=False, compare=False)
    _action_set: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("scenes", "actions"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be non-empty and unique, got {values!r}")
        if not self.default_action:
            object.__setattr__(self, "default_action", "click" if "click" in self.actions else self.actions[0])
        if self.default_action not in self.actions:
            raise ValueError(f"default action {self.default_action!r} is not one of {self.actions!r}")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.state_record_bound() > self.max_state_bytes:
            raise ValueError(f"{len(self.scenes)} scenes x window {self.window} could make a user's state record "
                             f"{self.state_record_bound():,} bytes, over the changelog's {self.max_state_bytes:,}: "
                             "use fewer scenes or a shorter window")
        object.__setattr__(self, "_scene_set", frozenset(self.scenes))
        object.__setattr__(self, "_action_set", frozenset(self.actions))

    def state_record_bound(self) -> int:
        """The most bytes a user's changelog record can take (stream/live/changelog.py's binary form: per scene its
        name, n, and per event ts, id, item and action with their sizes), every id and item at the byte limit. The
        config is refused when this passes max_state_bytes, so no state ever fails to be written."""
        action = max(len(a.encode()) for a in self.actions)
        event = 8 + (2 + self.max_id_bytes) + (2 + self.max_id_bytes) + (2 + action)
        return 2 + sum(1 + len(s.encode()) + 2 + self.window * event for s in self.scenes)

    @classmethod
    def from_env(cls, **overrides) -> "StreamConfig":
        """Defaults, then SCENESTREAM_SCENES / SCENESTREAM_ACTIONS (the vocabulary of event logs given with
        --input), then explicit overrides (CLI flags). The window is a flag of `train`, not an environment setting:
        every other command takes it from the checkpoint."""
        env: dict = {}
        for name, var in (("scenes", SCENES_ENV), ("actions", ACTIONS_ENV)):
            if os.environ.get(var):
                env[name] = _csv(os.environ[var])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())
