"""Commands that talk to topics: the embedded broker, producing an event log, publishing catalog updates."""
from __future__ import annotations

import json
from typing import Iterable

import click

from ..live.config import bootstrap_servers
from ..offline.logs import SourceError
from .common import kafka_security_options, source_options


@click.command()
@click.option("--port", default=9092, help="TCP port on 127.0.0.1 (0 = pick a free one).")
def broker(port):
    """Run the embedded Kafka-protocol broker (Tansu, memory storage) in the foreground until Ctrl-C."""
    import signal
    import time

    from ..local.broker import EmbeddedBroker
    b = EmbeddedBroker(port=port or None)
    try:
        b.start()
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"embedded broker listening on {b.url}  (Ctrl-C stops it)")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while b.proc is not None and b.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()


def _send(broker_url: str, security, topic: str, lines: Iterable[bytes], **kw) -> int:
    import asyncio

    from ..live.produce import produce_lines
    try:
        return asyncio.run(produce_lines(bootstrap_servers(broker_url), topic, lines, security=security.client_kwargs(),
                                         **kw))
    except Exception as exc:  # aiokafka's connection errors
        raise click.ClickException(f"could not produce to {broker_url}: {exc}") from exc


@click.command()
@click.option("--broker", "broker_url", required=True, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT of the Kafka cluster to write to.")
@kafka_security_options
@click.option("--topic", default="clicks", help="Topic to write to.")
@source_options
@click.option("--rate", default=0.0, help="Events per second (0 = as fast as the broker takes them).")
def produce(broker_url, security, topic, dataset, input_path, scenes_mode, rate):
    """Load an event log or a data set (bad lines included, as they are) into a topic, keyed by user_id; data sets
    go in time order."""
    from ..offline.logs import raw_lines
    try:
        lines = raw_lines(dataset, input_path, scenes_mode)
    except SourceError as exc:
        raise click.UsageError(str(exc)) from exc
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sent = _send(broker_url, security, topic, lines, rate=rate, total=len(lines) if isinstance(lines, list) else None)
    click.echo(f"produced {sent} events to {topic}", err=True)


@click.command()
@click.option("--broker", "broker_url", required=True, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT of the Kafka cluster the workers read.")
@kafka_security_options
@click.option("--topic", default="item-catalog", help="The workers' --catalog-topic.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, exists=True),
              help="JSONL of catalog records (see stream/live/catalog.py), sent as they are, keyed by item_id.")
@click.option("--put", "put_id", default=None, help="Add (or replace) this item id.")
@click.option("--scene", default=None, help="Scene of the --put item.")
@click.option("--vector", default=None, help="JSON list of d floats for --put; omitted: the scene's cold-start "
                                             "vector (the mean of its items).")
@click.option("--delete", "delete_id", default=None, help="Remove this item id from every worker's index.")
def catalog(broker_url, security, topic, input_path, put_id, scene, vector, delete_id):
    """Publish item-catalog updates: workers add, replace and remove items without a restart."""
    chosen = [x for x in (input_path, put_id, delete_id) if x]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --input, --put or --delete")
    if input_path:
        with open(input_path, "rb") as f:
            lines = [line.rstrip(b"\n") for line in f if line.strip()]
    elif delete_id:
        lines = [json.dumps({"item_id": delete_id, "op": "delete"}).encode()]
    else:
        if not scene:
            raise click.UsageError("--put needs --scene")
        record = {"item_id": put_id, "scene": scene}
        if vector:
            try:
                record["vector"] = json.loads(vector)
            except ValueError as exc:
                raise click.UsageError(f"--vector is not JSON: {exc}") from exc
        lines = [json.dumps(record).encode()]
    sent = _send(broker_url, security, topic, lines, progress=len(lines) > 1000, key_field="item_id")
    click.echo(f"sent {sent} catalog records to {topic}", err=True)


COMMANDS = (broker, produce, catalog)
