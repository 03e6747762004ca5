"""What several commands share: the event source options, the device option, and opening a checkpoint, each
turning the library's errors into one clear line (click.ClickException) instead of a traceback."""
from __future__ import annotations

import logging

import click

from ..core.config import StreamConfig
from ..logs import DATASETS, SourceError

log = logging.getLogger("scenestream")

DEVICE = click.Choice(["auto", "cpu", "cuda"])


def device_option(f):
    return click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")(f)


def encoder_cache_option(f):
    from scenestream.model.presets import ENCODER_CACHE_MB
    return click.option("--encoder-cache-mb", type=click.FloatRange(min=0), default=ENCODER_CACHE_MB,
                        envvar="SCENESTREAM_ENCODER_CACHE_MB", show_default=True,
                        help="Memory for the incremental encoder's cache: per window (each (user, scene) window "
                             "and each user's merged window of all scenes), the keys and values of its newest "
                             "positions (at the default model size ~25 KB for a merged window, ~13 KB for a "
                             "scene window through its one-layer stack; the budget is split S scene windows to one "
                             "merged), so that new events encode only themselves. Least recently used windows are "
                             "dropped first; 0 encodes every touched window whole.")(f)


def source_options(f):
    f = click.option("--input", "input_path", type=click.Path(dir_okay=False),
                     help="Event log: JSONL (one event per line) or CSV with a header of event fields.")(f)
    f = click.option("--dataset", type=click.Choice(DATASETS),
                     help="A named data set instead of --input. 'synthetic' is exactly what `generate` writes "
                          "with its defaults; ml-1m / ml-100k are fetched once into the cache; ml-1m-5core is "
                          "ML-1M's 5-core (6,040 users, 3,416 items, 999,611 ratings: the SASRec+/gSASRec "
                          "protocol).")(f)
    f = click.option("--scenes", "scenes_mode", type=click.Choice(["genre", "single"]), default="genre",
                     show_default=True, help="MovieLens only: scenes from each movie's first genre, or one scene.")(f)
    return f


def load(dataset, input_path, scenes_mode, config=None):
    """The decoded events of --dataset / --input; invalid lines counted and logged, none at all an error."""
    from ..logs import load_events
    try:
        loaded = load_events(dataset, input_path, config=config, scenes_mode=scenes_mode)
    except SourceError as exc:
        raise click.UsageError(str(exc)) from exc
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not loaded.events:
        raise click.ClickException(f"no valid events in the input ({loaded.n_invalid} invalid: "
                                   f"{dict(loaded.invalid)})")
    if loaded.n_invalid:
        log.warning("skipped %d invalid lines: %s", loaded.n_invalid, dict(loaded.invalid))
    return loaded


def open_model(checkpoint: str, device: str, cache_mb: float | None = None):
    """An InterestEncoder over the checkpoint, on the device asked for (cache_mb None: the default cache)."""
    from scenestream.model.checkpoint import CheckpointError, load_checkpoint
    from scenestream.model.infer import InterestEncoder, resolve_device
    try:
        dev = resolve_device(device)
        extra = {} if cache_mb is None else {"cache_mb": cache_mb}
        return InterestEncoder(load_checkpoint(checkpoint, dev), dev, **extra)
    except (CheckpointError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


def model_and_events(checkpoint, device, dataset, input_path, scenes_mode, cache_mb=None):
    """The checkpoint's model, and the data decoded with the checkpoint's scenes and actions."""
    encoder = open_model(checkpoint, device, cache_mb)
    config = StreamConfig(scenes=encoder.scenes, actions=encoder.ckpt.actions, window=encoder.window)
    loaded = load(dataset, input_path, scenes_mode, config)
    if tuple(loaded.scenes) != tuple(encoder.scenes):
        raise click.ClickException(f"the data's scenes {list(loaded.scenes)} differ from the checkpoint's "
                                   f"{list(encoder.scenes)}")
    return encoder, loaded
