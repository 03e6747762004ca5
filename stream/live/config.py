"""The worker's settings: one dataclass, the single source of every default. `scenestream worker` makes one command-line
option of each field that has help text (stream/cli/serve.py: `config_options`), so a default or a rule lives here
only. Light on purpose: the CLI reads it to show --help without loading Kafka, Faust or torch.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.config import CODECS
from ..core.output import FORMATS
from .kafka_security import KafkaSecurity

# Group membership of every consumer-group member the worker runs (the clicks feeder, the re-keying stage): with
# Kafka's usual 45 s session and 60 s rebalance timeouts the first group join on the embedded broker took ~32 s
# (BENCHMARKS.md, "Startup"), and a restarted worker waited that long for its dead predecessor's session.
SESSION_TIMEOUT_S = 6.0
HEARTBEAT_INTERVAL_S = 1.0
REBALANCE_TIMEOUT_S = 10.0

INDEX_KINDS = ("auto", "exact", "ivf-flat", "ivf-pq", "hnsw")
ISOLATION_LEVELS = ("read_committed", "read_uncommitted")
STATES = ("memory", "rocksdb")


def setting(default: Any, help: str, *, flag: str = "", choices: tuple = (), min: Optional[float] = None,
            envvar: str = "", path: str = "", required: bool = False, secret: bool = False) -> Any:
    """A WorkerConfig field that is also a `scenestream worker` option: its default, help and constraints.
    flag: the option's name when not --field-name; path: "any" or "dir" for a filesystem path; required: the
    command needs it although the dataclass has a default; secret: never in the dataclass's repr."""
    return field(default=default, repr=not secret, metadata=dict(help=help, flag=flag, choices=choices, min=min,
                                                                 envvar=envvar, path=path, required=required))


def bootstrap_servers(url: str) -> str:
    """'kafka://h1:9092,kafka://h2:9092' (Faust's form) -> 'h1:9092,h2:9092' (aiokafka's)."""
    return ",".join(u.split("://", 1)[-1] for u in url.split(","))


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name: not known to be loopback
        return False


def bind_problem(host: str, canonical_url: str) -> Optional[str]:
    """Why the worker cannot bind `host` as configured, or None: a non-loopback bind needs the URL the other
    workers reach it at (a bind address such as 0.0.0.0 is none, and a pod's hostname does not resolve)."""
    if is_loopback(host) or canonical_url:
        return None
    return (f"--web-host {host} is not a loopback address: set --canonical-url (SCENESTREAM_WORKER_CANONICAL_URL) "
            f"to the URL other workers reach this one at; on Kubernetes http://$(POD_IP):PORT, POD_IP from the "
            f"downward API (status.podIP)")


def memory_cap_problem(on_disk: bool, max_users: int, idle_s: float) -> Optional[str]:
    """Users can leave memory only for the disk: a cap or a TTL without the rocksdb state is refused."""
    if (max_users or idle_s) and not on_disk:
        return ("--max-users-in-memory and --idle-user-ttl need --state rocksdb (users leave memory for the disk)")
    return None


@dataclass(frozen=True)
class WorkerConfig:
    broker: str = setting(None, "kafka://HOST:PORT[,HOST:PORT] of the Kafka cluster (`scenestream broker` runs an "
                          "embedded one; `scenestream run` starts one for you).", envvar="SCENESTREAM_BROKER",
                          required=True)
    checkpoint: str = setting("", "Checkpoint folder from `train`. The worker serves it and watches the folder for "
                              "new models (--model-poll).", envvar="SCENESTREAM_CHECKPOINT", path="any",
                              required=True)
    app_id: str = setting("scenestream", "Consumer group and topic prefix of the worker.")
    clicks_topic: str = setting("clicks", "Input topic (key = user_id, or any key with --rekey).")
    dlq_topic: str = setting("clicks-dlq", "Dead letters: raw bytes, reason, source position.")
    output_topic: str = setting("user-interests", "Published per-user records (key = user_id).")
    changelog_topic: str = ""            # default: <app_id>-state-changelog
    partitions: int = setting(4, "Partitions of the topics the worker creates.", min=1)
    batch_max: int = setting(5000, "Most events in one micro-batch. A batch is whatever the consumer has buffered, "
                             "so this cap only bites on a backlog, where larger batches cost less per event "
                             "(BENCHMARKS.md) but each takes longer.", min=1)
    batch_wait: float = setting(0.2, "Longest wait, in seconds, for a first record when nothing is buffered; a "
                                "micro-batch is whatever the consumer has buffered then, so it never waits to fill.",
                                min=0)
    fetch_wait: float = setting(0.05, "Longest time, in seconds, the broker may hold a fetch of clicks that finds "
                                "nothing new. Short for freshness; not shorter than a fetch takes the broker: the "
                                "embedded broker answers a fetch that outlasts it with nothing, and a consumer of a "
                                "long partition stalls.", min=0.001)
    web_host: str = setting("127.0.0.1", "HTTP bind address. Any address but a loopback one needs --canonical-url, "
                            "and without an API token logs a warning.")
    web_port: int = setting(6066, "HTTP port.", min=0)
    canonical_url: str = setting("", "URL other workers use to forward API requests here (default: "
                                 "http://WEB_HOST:WEB_PORT; required when WEB_HOST is not a loopback address; on "
                                 "Kubernetes http://$(POD_IP):PORT with POD_IP from the downward API, status.podIP).")
    api_token: str = setting("", "Bearer token required of every API request but /healthz and /readyz "
                             "(`Authorization: Bearer TOKEN`); every worker of the group needs the same one, and "
                             "forwarded requests carry it. Prefer the environment variable to the flag (a flag shows "
                             "in the process list). Empty = no token.", envvar="SCENESTREAM_API_TOKEN", secret=True)
    rate_limit: float = setting(100.0, "API requests per second per client address (a token bucket; bursts of one "
                                "second's worth), past which a request gets 429 with Retry-After. Behind a proxy "
                                "every request comes from the proxy's address: raise it, or limit there. "
                                "0 = no limit.", min=0)
    catalog_topic: str = setting("item-catalog", "Live catalog updates (add / replace / delete items), read in full "
                                 "by every worker.")
    index_kind: str = setting("auto", "Item index built at start (auto: exact up to 100k items, else the measured "
                              "ANN default).", choices=INDEX_KINDS)
    index_path: str = setting("", "Load this saved index (`scenestream index build`) instead of building one; "
                              "refused unless it was built for the checkpoint's model version.", flag="--index",
                              path="any")
    replication_factor: int = setting(1, "Replication factor of the topics the worker creates (use 3 on a "
                                      "production cluster).", min=1)
    max_clock_skew: float = setting(3600.0, "Seconds an event's ts may be ahead of its record's broker timestamp; "
                                    "later ones are dead letters (ts_in_future): a window of future events would "
                                    "make every real event late.", min=0)
    popularity_interval: float = setting(5.0, "Seconds between publications of each held partition's item counts "
                                         "(only those that changed) to `<app-id>-popularity`, which every worker "
                                         "follows: the popular fallback of every worker agrees within about this "
                                         "long.", min=0.1)
    model_poll: float = setting(30.0, "Seconds between looks at the --checkpoint folder: when a deploy has put a new "
                                "model there (same scenes, actions and window), the worker loads it and its item "
                                "index in the background and swaps both at once, keeping every window; records "
                                "published after carry its model_version. 0 = never (a new model needs a "
                                "restart).", min=0)
    security: KafkaSecurity = KafkaSecurity()   # TLS / SASL of every Kafka client: the --broker-* options
    state: str = setting("memory", "Where users' windows live. memory: all in RAM, rebuilt from the changelog topic "
                         "at start. rocksdb: also on local disk in --state-dir (the changelog stays the source of "
                         "truth), so a restart with the directory intact reads only the changelog written since, and "
                         "memory can be capped (--max-users-in-memory, --idle-user-ttl).", choices=STATES)
    state_dir: str = setting("scenestream-state", "Directory of the rocksdb state (one RocksDB per changelog "
                             "partition); keep it on a persistent volume.", path="dir")
    max_users_in_memory: int = setting(0, "With --state rocksdb: at most this many users in RAM, least recently used "
                                       "leave first (their windows stay on disk and come back when touched). "
                                       "0 = no cap.", min=0)
    idle_user_ttl: float = setting(0.0, "With --state rocksdb: seconds a user may stay in RAM untouched before "
                                   "leaving for disk. 0 = no limit.", min=0)
    broker_outage_limit: float = setting(30.0, "Seconds the worker waits for a Kafka broker that stopped answering "
                                         "(aiokafka retries; /readyz answers 503 after 5 s of silence, with the "
                                         "reason) before it exits with code 69 and one line, so that a restart "
                                         "recovers from durable state. Above about 40 s (aiokafka's request timeout) "
                                         "a worker with batches in flight ends at that timeout instead, the same "
                                         "way. A broker unreachable at start is refused at once (exit 1, one "
                                         "line).", min=1)
    isolation_level: str = setting("read_committed", "How clicks and the catalog are read: read_committed skips the "
                                   "records of aborted transactions (a transactional producer's writes count once "
                                   "committed). The embedded broker does not filter them: there the two read the "
                                   "same (docs/operations.md, \"Real producers\").", choices=ISOLATION_LEVELS)
    compression: str = setting("zstd", "Codec of the record batches the worker writes (outputs, changelog, dead "
                               "letters); any codec is read (BENCHMARKS.md, \"Compression\").",
                               choices=CODECS)
    output_format: str = setting("binary", "Form of the records on --output-topic. binary: the fields as "
                                 "little-endian float32 arrays (the layout, and `read_record` to read either form: "
                                 "stream/core/output.py). json: one object per record, about 7x the worker's CPU per "
                                 "record with its compression, and a third more bytes (docs/operations.md, \"Output "
                                 "record\").",
                                 choices=FORMATS)
    rekey: bool = setting(False, "For clicks not keyed by user_id (by session, device, or null keys): each worker "
                          "also re-keys the clicks topic into APP_ID-clicks-by-user, keyed by user_id, and reads "
                          "that. Without it, an event whose key is not its user_id is a dead letter "
                          "(key_mismatch).")

    def __post_init__(self):
        problem = bind_problem(self.web_host, self.canonical_url) or \
            memory_cap_problem(self.state == "rocksdb", self.max_users_in_memory, self.idle_user_ttl)
        if problem:
            raise ValueError(problem)

    @property
    def url(self) -> str:
        host = f"[{self.web_host}]" if ":" in self.web_host else self.web_host   # an IPv6 address
        return self.canonical_url or f"http://{host}:{self.web_port}"   # bind_problem: set for non-loopback binds

    @property
    def bootstrap(self) -> str:
        return bootstrap_servers(self.broker)

    @property
    def changelog(self) -> str:
        return self.changelog_topic or f"{self.app_id}-state-changelog"

    @property
    def popularity_topic(self) -> str:
        return f"{self.app_id}-popularity"

    @property
    def feed_topic(self) -> str:
        """What the micro-batches read: the clicks topic, or with `rekey` its copy keyed by user_id."""
        return f"{self.app_id}-clicks-by-user" if self.rekey else self.clicks_topic
