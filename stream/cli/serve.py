"""Serving commands: the live worker, and `run`, the whole system on one machine."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..core.config import CODECS
from .common import DEVICE, encoder_cache_option, torch_threads_option, kafka_security_options, open_model


@click.command()
@click.option("--broker", "broker_url", required=True, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT[,HOST:PORT] of the Kafka cluster (`scenestream broker` runs an embedded one; "
                   "`scenestream run` starts one for you).")
@kafka_security_options
@click.option("--checkpoint", required=True, envvar="SCENESTREAM_CHECKPOINT", type=click.Path(),
              help="Checkpoint folder from `train`.")
@click.option("--app-id", default="scenestream", help="Consumer group and topic prefix of the worker.")
@click.option("--clicks-topic", default="clicks", help="Input topic (key = user_id).")
@click.option("--dlq-topic", default="clicks-dlq", help="Dead letters: raw bytes, reason, source position.")
@click.option("--output-topic", default="user-interests", help="Published per-user records (key = user_id).")
@click.option("--partitions", default=4, help="Partitions of the topics the worker creates.")
@click.option("--batch-max", default=5000, help="Most events in one micro-batch. A batch is whatever the consumer "
              "has buffered, so this cap only bites on a backlog, where larger batches cost less per event "
              "(BENCHMARKS.md, live path) but each takes longer.")
@click.option("--batch-wait", default=0.2, help="Longest wait, in seconds, for a first record when nothing is "
              "buffered; a micro-batch is whatever the consumer has buffered then, so it never waits to fill.")
@click.option("--fetch-wait", default=0.05, type=click.FloatRange(min=0.001),
              help="Longest time, in seconds, the broker may hold a fetch of clicks that finds nothing new. Short "
                   "for freshness; not shorter than a fetch takes the broker: the embedded broker answers a fetch "
                   "that outlasts it with nothing, and a consumer of a long partition stalls (BENCHMARKS.md, "
                   "\"Soak\").")
@click.option("--web-host", default="127.0.0.1", help="HTTP bind address. Any address but a loopback one needs "
              "--canonical-url, and without an API token logs a warning.")
@click.option("--web-port", default=6066, help="HTTP port.")
@click.option("--canonical-url", default="", help="URL other workers use to forward API requests here "
              "(default: http://WEB_HOST:WEB_PORT; required when WEB_HOST is not a loopback address; on Kubernetes "
              "http://$(POD_IP):PORT with POD_IP from the downward API, status.podIP).")
@click.option("--api-token", default="", envvar="SCENESTREAM_API_TOKEN",
              help="Bearer token required of every API request but /healthz and /readyz (`Authorization: Bearer "
                   "TOKEN`); every worker of the group needs the same one, and forwarded requests carry it. Prefer "
                   "the environment variable to the flag (a flag shows in the process list). Empty = no token.")
@click.option("--rate-limit", default=100.0, type=click.FloatRange(min=0),
              help="API requests per second per client address (a token bucket; bursts of one second's worth), "
                   "past which a request gets 429 with Retry-After. Behind a proxy every request comes from the "
                   "proxy's address: raise it, or limit there. 0 = no limit.")
@click.option("--device", type=DEVICE, default="auto", help="auto = CUDA when present, else CPU.")
@click.option("--catalog-topic", default="item-catalog",
              help="Live catalog updates (add / replace / delete items), read in full by every worker.")
@click.option("--index-kind", type=click.Choice(["auto", "exact", "ivf-flat", "ivf-pq", "hnsw"]), default="auto",
              help="Item index built at start (auto: exact up to 100k items, else the measured ANN default).")
@click.option("--index", "index_path", default="", type=click.Path(),
              help="Load this saved index (`scenestream index build`) instead of building one; refused unless it "
                   "was built for the checkpoint's model version.")
@click.option("--replication-factor", default=1, type=click.IntRange(min=1),
              help="Replication factor of the topics the worker creates (use 3 on a production cluster).")
@click.option("--max-clock-skew", default=3600.0, type=click.FloatRange(min=0),
              help="Seconds an event's ts may be ahead of its record's broker timestamp; later ones are dead "
                   "letters (ts_in_future): a window of future events would make every real event late.")
@click.option("--popularity-interval", default=5.0, type=click.FloatRange(min=0.1),
              help="Seconds between publications of each held partition's item counts (only those that changed) "
                   "to `<app-id>-popularity`, which every worker follows: the popular fallback of every worker "
                   "agrees within about this long.")
@click.option("--model-poll", default=30.0, type=click.FloatRange(min=0),
              help="Seconds between looks at the --checkpoint folder: when a deploy has put a new model there (same "
                   "scenes, actions and window), the worker loads it and its item index in the background and "
                   "swaps both at once, keeping every window; records published after carry its model_version. "
                   "0 = never (a new model needs a restart).")
@click.option("--state", type=click.Choice(["memory", "rocksdb"]), default="memory",
              help="Where users' windows live. memory: all in RAM, rebuilt from the changelog topic at start. "
                   "rocksdb: also on local disk in --state-dir (the changelog stays the source of truth), so a "
                   "restart with the directory intact reads only the changelog written since, and memory can be "
                   "capped (--max-users-in-memory, --idle-user-ttl).")
@click.option("--state-dir", default="scenestream-state", type=click.Path(file_okay=False),
              help="Directory of the rocksdb state (one RocksDB per changelog partition); keep it on a persistent "
                   "volume.")
@click.option("--max-users-in-memory", default=0, type=click.IntRange(min=0),
              help="With --state rocksdb: at most this many users in RAM, least recently used leave first (their "
                   "windows stay on disk and come back when touched). 0 = no cap.")
@click.option("--idle-user-ttl", default=0.0, type=click.FloatRange(min=0),
              help="With --state rocksdb: seconds a user may stay in RAM untouched before leaving for disk. "
                   "0 = no limit.")
@click.option("--broker-outage-limit", default=30.0, type=click.FloatRange(min=1),
              help="Seconds the worker waits for a Kafka broker that stopped answering (aiokafka retries; /readyz "
                   "answers 503 after 5 s of silence, with the reason) before it exits with code 69 and one line, "
                   "so that a restart recovers from durable state. Above about 40 s (aiokafka's request timeout) a "
                   "worker with batches in flight ends at that timeout instead, the same way. A broker unreachable "
                   "at start is refused at once (exit 1, one line).")
@click.option("--isolation-level", type=click.Choice(["read_committed", "read_uncommitted"]),
              default="read_committed",
              help="How clicks and the catalog are read: read_committed skips the records of aborted transactions "
                   "(a transactional producer's writes count once committed). The embedded broker does not filter "
                   "them: there the two read the same (docs/operations.md, \"Real producers\").")
@click.option("--compression", type=click.Choice(CODECS), default="zstd",
              help="Codec of the record batches the worker writes (outputs, changelog, dead letters); any codec is "
                   "read (BENCHMARKS.md, \"Compression\").")
@click.option("--rekey/--no-rekey", default=False,
              help="For clicks not keyed by user_id (by session, device, or null keys): each worker also re-keys "
                   "the clicks topic into APP_ID-clicks-by-user, keyed by user_id, and reads that. Without it, an "
                   "event whose key is not its user_id is a dead letter (key_mismatch).")
@encoder_cache_option
@torch_threads_option
def worker(broker_url, checkpoint, app_id, clicks_topic, dlq_topic, output_topic, partitions, batch_max,
           batch_wait, fetch_wait, web_host, web_port, canonical_url, api_token, rate_limit, device, catalog_topic,
           index_kind, index_path,
           replication_factor, max_clock_skew, popularity_interval, model_poll, state, state_dir,
           max_users_in_memory, idle_user_ttl, broker_outage_limit, isolation_level, compression, rekey,
           encoder_cache_mb, security):
    """The live worker: consume clicks, update windows, publish fused interest vectors, serve the HTTP API."""
    import asyncio

    from scenestream.index import IndexVersionError

    from ..web import bind_problem
    from ..worker import WorkerConfig, check_reachable, open_index, prepare_topics, run_worker
    if problem := bind_problem(web_host, canonical_url):
        raise click.UsageError(problem)
    if state != "rocksdb" and (max_users_in_memory or idle_user_ttl):
        raise click.UsageError("--max-users-in-memory and --idle-user-ttl need --state rocksdb (users leave memory "
                               "for the disk)")
    encoder = open_model(checkpoint, device, encoder_cache_mb)
    try:
        check_reachable(broker_url, security.client_kwargs())
    except Exception as exc:
        raise click.ClickException(f"Kafka broker {broker_url} is unreachable: {exc!r}") from exc
    cfg = WorkerConfig(broker=broker_url, app_id=app_id, clicks_topic=clicks_topic, dlq_topic=dlq_topic,
                       output_topic=output_topic, partitions=partitions, batch_max=batch_max, batch_wait=batch_wait,
                       fetch_wait=fetch_wait,
                       web_host=web_host, web_port=web_port, canonical_url=canonical_url,
                       api_token=api_token, rate_limit=rate_limit,
                       catalog_topic=catalog_topic, index_kind=index_kind, index_path=index_path,
                       replication_factor=replication_factor, max_clock_skew=max_clock_skew,
                       popularity_interval=popularity_interval, checkpoint=checkpoint, model_poll=model_poll,
                       security=security, state=state, state_dir=state_dir,
                       max_users_in_memory=max_users_in_memory, idle_user_ttl=idle_user_ttl,
                       broker_outage_limit=broker_outage_limit, isolation_level=isolation_level,
                       compression=compression, rekey=rekey)
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
              help="Model to serve. Default: a small model trained on the synthetic data (cached).")
@click.option("--broker", "broker_url", default=None, envvar="SCENESTREAM_BROKER",
              help="kafka://HOST:PORT of a real Kafka instead of the embedded broker.")
@kafka_security_options
@click.option("--log", "log_path", default=None, type=click.Path(dir_okay=False),
              help="Worker log file. Default: <cache>/run/worker.log.")
def run_cmd(port, broker_port, rate, checkpoint, broker_url, log_path, security):
    """The main job: embedded broker + model + worker + API + a synthetic clickstream. Ctrl-C stops all."""
    from ..cache import cache_dir
    from ..run import run_demo
    path = Path(log_path) if log_path else cache_dir("run", "worker.log")
    try:
        sys.exit(run_demo(port, broker_port, rate, checkpoint, broker_url, path, security))
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc


COMMANDS = (worker, run_cmd)
