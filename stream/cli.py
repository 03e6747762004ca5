"""`scenestream`: the command line. Each subcommand is a thin shell over the functions it names.

Every option can also be set by an environment variable SCENESTREAM_<OPTION> (for example SCENESTREAM_DEVICE=cpu);
a flag on the command line wins over the variable, which wins over the default shown in --help.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .config import StreamConfig
from .broker import bootstrap_servers
from .logs import DATASETS

log = logging.getLogger("scenestream")

DEVICE = click.Choice(["auto", "cpu", "cuda"])


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _source_options(f):
    f = click.option("--input", "input_path", type=click.Path(dir_okay=False),
                     help="Event log: JSONL (one event per line) or CSV with a header of event fields.")(f)
    f = click.option("--dataset", type=click.Choice(DATASETS),
                     help="A named data set instead of --input. 'synthetic' is exactly what `generate` writes "
                          "with its defaults; ml-1m / ml-100k are fetched once into the cache.")(f)
    f = click.option("--scenes", "scenes_mode", type=click.Choice(["genre", "single"]), default="genre",
                     show_default=True, help="MovieLens only: scenes from each movie's first genre, or one scene.")(f)
    return f


def _load(dataset, input_path, scenes_mode, config=None):
    from .logs import load_events
    if (dataset is None) == (input_path is None):
        raise click.UsageError("give exactly one of --dataset or --input")
    try:
        loaded = load_events(dataset, input_path, config=config, scenes_mode=scenes_mode)
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not loaded.events:
        raise click.ClickException(f"no valid events in the input ({loaded.n_invalid} invalid: "
                                   f"{dict(loaded.invalid)})")
    if loaded.n_invalid:
        log.warning("skipped %d invalid lines: %s", loaded.n_invalid, dict(loaded.invalid))
    return loaded


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "SCENESTREAM",
                               "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """SceneStream: streaming real-time multi-scene interest updates for recommenders.

    \b
    Typical offline loop:
      scenestream generate --out events.jsonl
      scenestream train --input events.jsonl --cutoff 0.8 --out ckpt
      scenestream replay --input events.jsonl --checkpoint ckpt --eval-cutoff 0.8 --json
    """
    _setup_logging(verbose)


@main.command()
@click.option("--users", default=2000, help="Number of synthetic users.")
@click.option("--seed", default=0, help="Random seed: the same seed writes the same log.")
@click.option("--items-per-scene", default=300, help="Catalog size per scene.")
@click.option("--clean", is_flag=True, help="Write no malformed lines (by default ~3% are, on purpose).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL path.")
def generate(users, seed, items_per_scene, clean, out):
    """Write a seeded synthetic multi-scene clickstream (JSONL, event schema of the README)."""
    from .logs import synthetic_lines, write_jsonl
    from .synthetic import SyntheticSpec
    spec = SyntheticSpec(users=users, seed=seed, items_per_scene=items_per_scene)
    lines = synthetic_lines(spec, clean=clean)
    write_jsonl(out, lines)
    click.echo(f"wrote {len(lines)} lines to {out}", err=True)


@main.command()
@_source_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--epochs", type=int, default=None, help="Planned epochs: the learning rate decays to 0 over them; "
              "early stopping on validation NDCG@10 may end sooner. [default: per data set, see below]")
@click.option("--cutoff", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Train only on the first fraction F of events by time (recorded in the checkpoint).")
@click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")
@click.option("--window", type=int, default=None, help="Events kept per (user, scene): L. [default: layers*span+2]")
@click.option("--dim", default=64, help="Model width d.")
@click.option("--layers", default=2, help="Attention layers.")
@click.option("--span", type=int, default=None, help="Attention look-back per layer (window >= layers*span+2 keeps "
                                                     "encoding independent of where the window starts). [default: "
                                                     "per data set]")
@click.option("--batch-users", type=int, default=None, help="User segments per training step. [default: per data "
                                                            "set]")
@click.option("--segment", type=int, default=None, help="Targets per user segment. [default: per data set]")
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate. [default: per data set]")
@click.option("--patience", default=3, help="Epochs without improvement before stopping.")
@click.option("--seed", default=0, help="Training seed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
def train(dataset, input_path, scenes_mode, out, epochs, cutoff, device, window, dim, layers, span, batch_users,
          segment, lr, patience, seed, as_json):
    """Train the interest model (next-item prediction, full-softmax CE, time-ordered leave-one-out validation).

    \b
    Defaults per data set (any flag overrides them):
    {presets}
    """
    from model.checkpoint import save_checkpoint
    from model.infer import resolve_device
    from model.train import TrainConfig, train_model

    from .logs import time_cutoff
    from model.train import preset
    given = {"epochs": epochs, "batch_users": batch_users, "segment": segment, "lr": lr, "span": span}
    chosen = {**preset(dataset), **{k: v for k, v in given.items() if v is not None}}
    span = chosen.pop("span")
    window = window or layers * span + 2
    loaded = _load(dataset, input_path, scenes_mode, StreamConfig.from_env(window=window))
    events = loaded.events
    cutoff_ts = None
    if cutoff is not None:
        cutoff_ts = time_cutoff(events, cutoff)
        events = [e for e in events if e.ts < cutoff_ts]
        log.info("cutoff %.2f: training on %d of %d events (ts < %d)", cutoff, len(events), len(loaded.events),
                 cutoff_ts)
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    from .config import DEFAULT_ACTIONS
    cfg = TrainConfig(patience=patience, seed=seed, **chosen)
    ckpt, history = train_model(events, loaded.scenes, DEFAULT_ACTIONS, window,
                                model_cfg={"d_model": dim, "n_layers": layers, "span": span}, cfg=cfg,
                                device=str(dev), progress=True)
    meta = {"dataset": dataset or str(input_path), "scenes_mode": scenes_mode, "cutoff": cutoff,
            "cutoff_ts": cutoff_ts if cutoff_ts is not None else max(e.ts for e in loaded.events) + 1,
            "device": str(dev), **history}
    version = save_checkpoint(out, ckpt.model, ckpt.vocab, ckpt.scenes, ckpt.actions, window, meta)
    summary = {"checkpoint": str(out), "model_version": version, "seconds": history["seconds"],
               "epochs": len(history["epochs"]), "best_val_ndcg@10": round(history["best_val_ndcg@10"], 4),
               "train_events": history["train_events"], "users": history["users"], "items": history["items"]}
    click.echo(json.dumps(summary) if as_json else
               f"saved {out} (model {version}): best validation NDCG@10 {summary['best_val_ndcg@10']} "
               f"after {summary['epochs']} epochs, {summary['seconds']} s")


def _register_index_commands() -> None:
    from index.cli import index_group
    main.add_command(index_group, "index")


_register_index_commands()


def _train_help() -> str:
    from model.train import presets_help
    return presets_help()


train.help = train.help.replace("{presets}", _train_help())


def _open_model(checkpoint: str, device: str):
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.infer import InterestEncoder, resolve_device
    try:
        dev = resolve_device(device)
        return InterestEncoder(load_checkpoint(checkpoint, dev), dev)
    except (CheckpointError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _model_and_events(checkpoint, device, dataset, input_path, scenes_mode):
    """The checkpoint's model, and the data decoded with the checkpoint's scenes and actions."""
    encoder = _open_model(checkpoint, device)
    config = StreamConfig(scenes=encoder.scenes, actions=encoder.ckpt.actions, window=encoder.window)
    loaded = _load(dataset, input_path, scenes_mode, config)
    if tuple(loaded.scenes) != tuple(encoder.scenes):
        raise click.ClickException(f"the data's scenes {list(loaded.scenes)} differ from the checkpoint's "
                                   f"{list(encoder.scenes)}")
    return encoder, loaded


def _test_cases(checkpoint, device, dataset, input_path, scenes_mode):
    from model.evaluate import loo_cases
    from model.train import timelines
    encoder, loaded = _model_and_events(checkpoint, device, dataset, input_path, scenes_mode)
    return encoder, loo_cases(timelines(loaded.events), holdout=1)


@main.command()
@_source_options
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint folder from `train`.")
@click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")
@click.option("--vector", type=click.Choice(["global", "fused", "scene"]), default="global",
              help="global: the global fused vector ranks all items. fused: H_j of the test event's scene j ranks "
                   "scene j's items. scene: the scene-only h_j (fusion off) ranks scene j's items.")
@click.option("--scene-history", type=(int, int), default=None, metavar="MIN MAX",
              help="Only test events whose scene the user has MIN..MAX earlier events in (e.g. 1 2: sparse scenes, "
                   "where interest transfer matters).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object on the last line.")
def evaluate(dataset, input_path, scenes_mode, checkpoint, device, vector, scene_history, as_json):
    """Full-ranking leave-one-out test metrics: each user's last event (ties in time ordered by event_id, which for
    MovieLens is the file's line order) ranked among all items by the global fused vector built from everything
    before it, the user's other history items masked."""
    from model.evaluate import evaluate_loo, sparse_scene_cases
    encoder, cases = _test_cases(checkpoint, device, dataset, input_path, scenes_mode)
    if scene_history is not None:
        cases = sparse_scene_cases(cases, at_least=scene_history[0], at_most=scene_history[1])
    if vector == "scene" and any(not any(e.scene == c.target.scene for e in c.history) for c in cases):
        raise click.UsageError("--vector scene needs history in the test event's scene: add --scene-history 1 N")
    metrics = evaluate_loo(encoder, cases, target=vector)
    click.echo(json.dumps(metrics) if as_json else
               "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


@main.command()
@_source_options
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint folder from `train`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")
def export(dataset, input_path, scenes_mode, checkpoint, out, device):
    """Export item and user vectors with the held-out test items, so anyone can recompute `evaluate` with numpy:
    item_ids.txt, item_vectors.npy, user_ids.txt, user_vectors.npy, test_items.txt, history_items.txt."""
    from model.evaluate import export_loo
    encoder, cases = _test_cases(checkpoint, device, dataset, input_path, scenes_mode)
    click.echo(json.dumps({"out": str(out), **export_loo(encoder, cases, out)}))


@main.command()
@_source_options
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint folder from `train`.")
@click.option("--eval-cutoff", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.8,
              help="Prequential evaluation starts after this fraction of events by time.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write the final per-user records to OUT/users.jsonl (the worker's output schema).")
@click.option("--batch-size", default=1000, help="Most events in one micro-batch (as the worker's --batch-max).")
@click.option("--batch-wait", default=0.2, type=click.FloatRange(min=0), help="After the cutoff, a micro-batch "
              "spans less than this many seconds of event time, as the worker's --batch-wait at the log's own "
              "pace; 0 = cut by --batch-size only (fastest; fresh state then lags a batch behind).")
@click.option("--k", default=10, help="K of the prequential Recall@K.")
@click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on the last line.")
def replay(dataset, input_path, scenes_mode, checkpoint, eval_cutoff, out, batch_size, batch_wait, k, device,
           as_json):
    """Replay an event log through the live worker's code path; report prequential Recall@K for live, stale
    and most-popular recommendations."""
    from index import ItemIndex

    from .replay import replay as run_replay
    encoder, loaded = _model_and_events(checkpoint, device, dataset, input_path, scenes_mode)
    index = ItemIndex.build(*encoder.item_vectors())
    result = run_replay(loaded, encoder, index, batch_size=batch_size, eval_cutoff=eval_cutoff, k=k,
                        checkpoint_cutoff_ts=encoder.ckpt.meta.get("cutoff_ts"), batch_wait_ms=round(batch_wait * 1000))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "users.jsonl", "w") as f:
            for user in sorted(result.records):
                f.write(json.dumps(result.records[user]) + "\n")
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary))
    else:
        p = summary["prequential"]
        click.echo(f"events {summary['events']}  invalid {summary['invalid']}  late-dropped "
                   f"{summary['late_dropped']}  users {summary['users']}  {summary['events_per_s']} events/s")
        for m in ("live", "stale", "popular"):
            click.echo(f"prequential recall@{k} {m:8s} {p[m][f'recall@{k}']:.4f}  ({p[m]['evaluated']} events)")


@main.command()
@click.option("--port", default=9092, help="TCP port on 127.0.0.1 (0 = pick a free one).")
def broker(port):
    """Run the embedded Kafka-protocol broker (Tansu, memory storage) in the foreground until Ctrl-C."""
    import signal
    import time

    from .broker import EmbeddedBroker
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


@main.command()
@click.option("--broker", "broker_url", default=None, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT of the Kafka cluster. Unset: start the embedded broker.")
@click.option("--topic", default="clicks", help="Topic to write to.")
@_source_options
@click.option("--rate", default=0.0, help="Events per second (0 = as fast as the broker takes them).")
def produce(broker_url, topic, dataset, input_path, scenes_mode, rate):
    """Load an event log (bad lines included, as they are) into a topic, keyed by user_id."""
    import asyncio

    from .logs import read_raw, synthetic_lines
    from .produce import produce_lines
    if broker_url is None:
        raise click.UsageError("--broker (or SCENESTREAM_BROKER) is required: produce writes to a running broker")
    if (dataset is None) == (input_path is None):
        raise click.UsageError("give exactly one of --dataset or --input")
    if dataset not in (None, "synthetic"):
        raise click.UsageError("produce takes --input LOG or --dataset synthetic")
    if input_path is not None and not Path(input_path).is_file():
        raise click.ClickException(f"event log {input_path} does not exist")
    lines = synthetic_lines() if dataset else list(read_raw(input_path))
    try:
        sent = asyncio.run(produce_lines(bootstrap_servers(broker_url), topic, lines, rate=rate, total=len(lines)))
    except Exception as exc:  # aiokafka's connection errors
        raise click.ClickException(f"could not produce to {broker_url}: {exc}") from exc
    click.echo(f"produced {sent} events to {topic}", err=True)


@main.command()
@click.option("--broker", "broker_url", required=True, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT of the Kafka cluster the workers read.")
@click.option("--topic", default="item-catalog", help="The workers' --catalog-topic.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, exists=True),
              help="JSONL of catalog records (see stream/catalog.py), sent as they are, keyed by item_id.")
@click.option("--put", "put_id", default=None, help="Add (or replace) this item id.")
@click.option("--scene", default=None, help="Scene of the --put item.")
@click.option("--vector", default=None, help="JSON list of d floats for --put; omitted: the scene's cold-start "
                                             "vector (the mean of its items).")
@click.option("--delete", "delete_id", default=None, help="Remove this item id from every worker's index.")
def catalog(broker_url, topic, input_path, put_id, scene, vector, delete_id):
    """Publish item-catalog updates: workers add, replace and remove items without a restart."""
    import asyncio

    from .produce import produce_lines
    chosen = [x for x in (input_path, put_id, delete_id) if x]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --input, --put or --delete")
    if input_path:
        lines = [line.rstrip(b"\n") for line in open(input_path, "rb") if line.strip()]
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
    try:
        sent = asyncio.run(produce_lines(bootstrap_servers(broker_url), topic, lines, progress=len(lines) > 1000,
                                         key_field="item_id"))
    except Exception as exc:  # aiokafka's connection errors
        raise click.ClickException(f"could not produce to {broker_url}: {exc}") from exc
    click.echo(f"sent {sent} catalog records to {topic}", err=True)


@main.command()
@click.option("--broker", "broker_url", default=None, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT. Unset: start the embedded broker and stop it on exit.")
@click.option("--checkpoint", required=True, envvar="SCENESTREAM_CHECKPOINT", type=click.Path(),
              help="Checkpoint folder from `train`.")
@click.option("--app-id", default="scenestream", help="Consumer group and topic prefix of the worker.")
@click.option("--clicks-topic", default="clicks", help="Input topic (key = user_id).")
@click.option("--dlq-topic", default="clicks-dlq", help="Dead letters: raw bytes, reason, source position.")
@click.option("--output-topic", default="user-interests", help="Published per-user records (key = user_id).")
@click.option("--partitions", default=4, help="Partitions of the topics the worker creates.")
@click.option("--batch-max", default=1000, help="Most events in one micro-batch.")
@click.option("--batch-wait", default=0.2, help="Seconds a micro-batch waits to fill.")
@click.option("--web-host", default="127.0.0.1", help="HTTP bind address.")
@click.option("--web-port", default=6066, help="HTTP port.")
@click.option("--canonical-url", default="", help="URL other workers use to forward API requests here "
              "(default: http://WEB_HOST:WEB_PORT, or the hostname when binding 0.0.0.0).")
@click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")
@click.option("--recovery", type=click.Choice(["fence", "highwater"]), default="fence",
              help="How state is recovered from the changelog: 'fence' reads up to an offset the broker "
                   "acknowledged; 'highwater' trusts the reported end offset (wrong on Tansu; for tests).")
@click.option("--catalog-topic", default="item-catalog",
              help="Live catalog updates (add / replace / delete items), read in full by every worker.")
@click.option("--index-kind", type=click.Choice(["auto", "exact", "ivf-flat", "ivf-pq", "hnsw"]), default="auto",
              help="Item index built at start (auto: exact up to 100k items, else the measured ANN default).")
@click.option("--index", "index_path", default="", type=click.Path(),
              help="Load this saved index (`scenestream index build`) instead of building one; refused unless it "
                   "was built for the checkpoint's model version.")
def worker(broker_url, checkpoint, app_id, clicks_topic, dlq_topic, output_topic, partitions, batch_max,
           batch_wait, web_host, web_port, canonical_url, device, recovery, catalog_topic, index_kind, index_path):
    """The live worker: consume clicks, update windows, publish fused interest vectors."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    from .broker import EmbeddedBroker
    from .worker import WorkerConfig, run_worker
    encoder = _open_model(checkpoint, device)
    embedded = None
    if broker_url is None:
        embedded = EmbeddedBroker().start()
        broker_url = embedded.url
        click.echo(f"embedded broker on {broker_url}", err=True)

    async def reachable():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(broker_url), request_timeout_ms=5000)
        await asyncio.wait_for(admin.start(), 10)
        await admin.close()
    try:
        asyncio.run(reachable())
    except Exception as exc:
        if embedded:
            embedded.stop()
        raise click.ClickException(f"Kafka broker {broker_url} is unreachable: {exc!r}") from exc
    cfg = WorkerConfig(broker=broker_url, app_id=app_id, clicks_topic=clicks_topic, dlq_topic=dlq_topic,
                       output_topic=output_topic, partitions=partitions, batch_max=batch_max,
                       batch_wait=batch_wait, web_host=web_host, web_port=web_port, recovery=recovery,
                       canonical_url=canonical_url, catalog_topic=catalog_topic, index_kind=index_kind,
                       index_path=index_path)
    from index import IndexVersionError

    from .worker import open_index
    try:
        index = open_index(cfg, encoder)
    except (IndexVersionError, FileNotFoundError, ValueError) as exc:
        if embedded:
            embedded.stop()
        raise click.ClickException(str(exc)) from exc
    try:
        code = run_worker(cfg, encoder, index=index)
    finally:
        if embedded:
            embedded.stop()
    sys.exit(code)


@main.command("run")
@click.option("--port", default=6066, help="HTTP port of the API.")
@click.option("--broker-port", default=9092, help="Port of the embedded broker (0 = any free port).")
@click.option("--rate", default=200.0, help="Synthetic events per second streamed into `clicks`.")
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Model to serve. Default: a small model trained on the synthetic data (cached).")
@click.option("--broker", "broker_url", default=None, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT of a real Kafka instead of the embedded broker.")
@click.option("--log", "log_path", default=None, type=click.Path(dir_okay=False),
              help="Worker log file. Default: <cache>/run/worker.log.")
def run_cmd(port, broker_port, rate, checkpoint, broker_url, log_path):
    """The main job: embedded broker + model + worker + API + a synthetic clickstream. Ctrl-C stops all."""
    from .run import cache_dir, run_demo
    path = Path(log_path) if log_path else cache_dir() / "run" / "worker.log"
    try:
        sys.exit(run_demo(port, broker_port, rate, checkpoint, broker_url, path))
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
