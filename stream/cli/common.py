"""What several commands share: the event source options, the device option, and opening a checkpoint, each
turning the library's errors into one clear line (click.ClickException) instead of a traceback."""
from __future__ import annotations

import functools
import logging

import click

from ..core.config import StreamConfig
from ..live.kafka_security import ENVVARS, MECHANISMS, PASSWORD_FILE_ENV, PROTOCOLS, SASL_PASSWORD_ENV, \
    SSL_KEY_PASSWORD_ENV, KafkaSecurity
from ..offline.columns import TS_FORMATS
from ..offline.logs import DATASETS, SourceError

log = logging.getLogger("scenestream")

DEVICE = click.Choice(["auto", "cpu", "cuda"])
TORCH_THREADS = 1   # measured: BENCHMARKS.md, "Live path" (2026-12-01 10:35)


def device_option(f):
    return click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")(f)


def _set_torch_threads(_ctx, _param, threads: int) -> int:
    if threads:
        import torch
        torch.set_num_threads(threads)
    return threads


def torch_threads_option(f):
    return click.option("--torch-threads", type=click.IntRange(min=0), default=TORCH_THREADS,
                        envvar="SCENESTREAM_TORCH_THREADS", show_default=True, expose_value=False,
                        callback=_set_torch_threads,
                        help="Threads torch may use for one encoder call on CPU (0: torch's default, one per "
                             "core). The machine has other work besides (the worker's own decoding, joins and "
                             "Kafka I/O, the broker), and a micro-batch's encoder calls are small, so a bigger pool "
                             "mostly competes with it: on 2 cores the worker ran 15% faster with 1 than with 2 "
                             "(BENCHMARKS.md, \"Live path\").")(f)


def encoder_cache_option(f):
    from scenestream.model.config import ENCODER_CACHE_MB
    return click.option("--encoder-cache-mb", type=click.FloatRange(min=0), default=ENCODER_CACHE_MB,
                        envvar="SCENESTREAM_ENCODER_CACHE_MB", show_default=True,
                        help="Memory for the incremental encoder's cache: per window (each (user, scene) window and "
                             "each user's merged window of all scenes), each layer's input rows at its newest "
                             "positions, which attention reads (at the default model size ~12 KB for a merged window, "
                             "~6 KB for a scene window through its one-layer stack; the budget is split S scene "
                             "windows to one merged), so that new events encode only themselves. Least recently used "
                             "windows are dropped first; 0 encodes every touched window whole.")(f)


def kafka_security_options(f):
    """The --broker-* TLS/SASL flags, handed to the command as one `security` (a KafkaSecurity). The passwords have
    no flag: a flag shows in the process list."""
    @functools.wraps(f)
    def command(*args, broker_security_protocol, broker_ssl_cafile, broker_ssl_certfile, broker_ssl_keyfile,
                broker_ssl_check_hostname, broker_sasl_mechanism, broker_sasl_username, broker_sasl_password_file,
                **kwargs):
        try:
            security = KafkaSecurity.from_options(
                broker_security_protocol, broker_ssl_cafile, broker_ssl_certfile, broker_ssl_keyfile,
                broker_ssl_check_hostname, broker_sasl_mechanism, broker_sasl_username, broker_sasl_password_file)
        except (ValueError, OSError) as exc:
            raise click.UsageError(str(exc)) from exc
        return f(*args, security=security, **kwargs)

    path = click.Path(exists=True, dir_okay=False)
    for option in reversed((
            click.option("--broker-security-protocol", type=click.Choice(PROTOCOLS), default="PLAINTEXT",
                         envvar=ENVVARS["security_protocol"], help="How the Kafka clients talk to the brokers: "
                         "TLS (SSL), SASL, or both (SASL_SSL)."),
            click.option("--broker-ssl-cafile", type=path, envvar=ENVVARS["ssl_cafile"],
                         help="CA bundle (PEM) the brokers' certificates are checked against (default: the "
                              "system's CAs)."),
            click.option("--broker-ssl-certfile", type=path, envvar=ENVVARS["ssl_certfile"],
                         help="Client certificate (PEM) for mutual TLS."),
            click.option("--broker-ssl-keyfile", type=path, envvar=ENVVARS["ssl_keyfile"],
                         help=f"Private key (PEM) of --broker-ssl-certfile; its password, if any, from "
                              f"{SSL_KEY_PASSWORD_ENV}."),
            click.option("--broker-ssl-check-hostname/--no-broker-ssl-check-hostname", default=True,
                         envvar=ENVVARS["ssl_check_hostname"],
                         help="Check that a broker's certificate names the host connected to."),
            click.option("--broker-sasl-mechanism", type=click.Choice(MECHANISMS), default="PLAIN",
                         envvar=ENVVARS["sasl_mechanism"], help="SASL mechanism (with SASL_PLAINTEXT / SASL_SSL)."),
            click.option("--broker-sasl-username", envvar=ENVVARS["sasl_username"], help="SASL user name."),
            click.option("--broker-sasl-password-file", type=path, envvar=PASSWORD_FILE_ENV,
                         help=f"File whose first line is the SASL password; else {SASL_PASSWORD_ENV}. There is no "
                              "password flag."))):
        command = option(command)
    return command


def source_options(run):
    @functools.wraps(run)
    def command(*args, input_path=None, columns=None, ts_format="auto", **kwargs):
        from ..offline.columns import parse_columns
        from ..offline.logs import LogInput
        if input_path is None and (columns or ts_format != "auto"):
            raise click.UsageError("--columns and --ts-format apply to an --input log")
        if input_path is not None:
            try:
                input_path = LogInput(input_path, tuple(parse_columns(columns).items()), ts_format)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from exc
        return run(*args, input_path=input_path, **kwargs)

    f = click.option("--ts-format", type=click.Choice(TS_FORMATS), default="auto", show_default=True,
                     help="Event times of --input: epoch ms, epoch s, or ISO-8601 text (a zone, else UTC). auto: "
                          "Parquet timestamp columns exactly, integers below 1e11 as seconds and above as ms, text "
                          "as ISO-8601; JSONL and CSV logs without --columns or --ts-format read ts as epoch ms, "
                          "as on Kafka.")(command)
    f = click.option("--columns", default=None, metavar="FIELD=COLUMN,...",
                     help="Column names of --input for event fields, e.g. user_id=uid,ts=event_time (fields not "
                          "named keep their own: event_id, user_id, item_id, scene, action, ts).")(f)
    f = click.option("--input", "input_path", type=click.Path(dir_okay=False),
                     help="Event log: JSONL (one event per line), CSV with a header, or Parquet (.parquet, read a "
                          "row group at a time); see --columns for other column names.")(f)
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
    from ..offline.logs import load_events
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
