"""Serving commands: the live worker, and `run`, the whole system on one machine."""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import click

from ..live.config import WorkerConfig
from .common import DEVICE, encoder_cache_option, torch_threads_option, kafka_security_options, open_model


def config_options(cls):
    """One option per field of the dataclass `cls` that has help text (stream/live/config.py: `setting`), with the
    field's default, constraints and help: the defaults live in the dataclass only."""
    def decorate(f):
        for fld in reversed(fields(cls)):
            meta = fld.metadata
            if "help" not in meta:
                continue
            flag = meta["flag"] or "--" + fld.name.replace("_", "-")
            kw: dict = {"help": meta["help"], "envvar": meta["envvar"] or None}
            if meta["required"]:
                kw["required"] = True
            else:
                kw["default"] = fld.default
            if fld.type in ("bool", bool):
                flag = f"{flag}/--no-{flag.removeprefix('--')}"
            elif meta["choices"]:
                kw["type"] = click.Choice(meta["choices"])
            elif meta["path"]:
                kw["type"] = click.Path(file_okay=meta["path"] != "dir")
            elif meta["min"] is not None:
                kind = {"int": click.IntRange, "float": click.FloatRange}[str(fld.type)]
                kw["type"] = kind(min=meta["min"])
            f = click.option(flag, fld.name, **kw)(f)
        return f
    return decorate


@click.command()
@config_options(WorkerConfig)
@kafka_security_options
@click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")
@encoder_cache_option
@torch_threads_option
def worker(device, encoder_cache_mb, security, **settings):
    """The live worker: consume clicks, update windows, publish fused interest vectors, serve the HTTP API."""
    import asyncio

    from scenestream.index import IndexVersionError

    from ..live.worker import check_reachable, open_index, prepare_topics, run_worker
    try:
        cfg = WorkerConfig(security=security, **settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    encoder = open_model(cfg.checkpoint, device, encoder_cache_mb)
    try:
        check_reachable(cfg.broker, security.client_kwargs())
    except Exception as exc:
        raise click.ClickException(f"Kafka broker {cfg.broker} is unreachable: {exc!r}") from exc
    try:
        index = open_index(cfg, encoder)
        asyncio.run(prepare_topics(cfg))
    except (IndexVersionError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(run_worker(cfg, encoder, index=index))


@click.command("run")
@click.option("--port", default=6066, help="HTTP port of the API.")
@click.option("--broker-port", default=9092, help="Port of the embedded broker (0 = any free port).")
@click.option("--rate", default=200.0, help="Synthetic events per second streamed into `clicks`.")
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Model to serve. Default: the small demo model shipped with the package (trained on the "
                   "synthetic data; `python -m scenestream.stream.local.run DIR` builds it).")
@click.option("--train-demo", is_flag=True,
              help="Train the demo model here (half a minute on 2 cores, cached for the next run) instead of using the "
                   "shipped one.")
@click.option("--broker", "broker_url", default=None, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT of a real Kafka instead of the embedded broker.")
@kafka_security_options
@click.option("--log", "log_path", default=None, type=click.Path(dir_okay=False),
              help="Worker log file. Default: <cache>/run/worker.log.")
def run_cmd(port, broker_port, rate, checkpoint, train_demo, broker_url, log_path, security):
    """The main job: embedded broker + model + worker + API + a synthetic clickstream. Ctrl-C stops all."""
    from ..datasets.cache import cache_dir
    from ..local.run import run_demo
    path = Path(log_path) if log_path else cache_dir("run", "worker.log")
    try:
        sys.exit(run_demo(port, broker_port, rate, checkpoint, broker_url, path, security, train_demo))
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


COMMANDS = (worker, run_cmd)
