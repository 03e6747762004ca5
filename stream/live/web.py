"""HTTP views of the worker (Faust web): recommendations with explanations, interests, history, health, metrics,
and the live page at / (live_page.html: charts of /live/stats, a user's weights, recommendations and history).

Views parse and validate a request, then call recommend.py and the micro-batch service; no recommendation logic
lives here. Requests for a user are forwarded to the worker that owns the user's partition of the clicks topic
(the group's partition -> URL table, stream/live/feeder.py), so any worker answers for any user. Bad parameters get a
4xx with a JSON error, never a 5xx. The API is described in openapi.yaml.

One aiohttp middleware guards every route, Faust's own views (/router/, /table/, ...) included: a per-client rate
limit, then, when an API token is set, `Authorization: Bearer <token>` on every path but the probes (docs/operations.md,
"Security").
"""
from __future__ import annotations

import base64
import hmac
import math
import time
from importlib.resources import files
from typing import Callable, Optional

import aiohttp
from aiohttp import web as aioweb
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..core.output import record_json
from ..core.config import StreamConfig
from ..core.events import Rejection, check_id
from .live_stats import LiveStats
from .recommend import recent_history, recommendation

MAX_K = 1000
FORWARDED = "X-SceneStream-Forwarded-By"   # a forwarded request is answered where it lands: never forwarded twice
TRUE, FALSE = {"true", "True", "1", "yes"}, {"false", "False", "0", "no"}   # openapi.yaml lists them
QUERY = frozenset({"scene", "k", "exclude_seen"})   # what /users/{user_id}/recommendations takes
OPEN_PATHS = frozenset({"/healthz", "/readyz"})   # probes (a kubelet sends no token); everything else needs it
LIVE_PAGE = "/"
HISTORY_MAX = 200   # events /users/{user_id}/history gives at most
FORWARD_TIMEOUT_S = 3.0   # a forwarded request's whole round trip; past it the client gets a 503
RELAYED = ("Retry-After", "WWW-Authenticate")   # headers of the owner's answer that the client gets too


def authorized(header: Optional[str], token: str) -> bool:
    """Whether an Authorization header carries the token (constant-time comparison): `Bearer <token>`, or HTTP Basic
    credentials whose password is the token (any user name), which a browser sends for the live page and its
    requests once asked."""
    header = header or ""
    if header.startswith("Basic "):
        try:
            _, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except ValueError:   # not base64, or not UTF-8
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return hmac.compare_digest(header.encode("utf-8", "replace"), f"Bearer {token}".encode())


class RateLimiter:
    """A token bucket per client: `rate` requests per second on average, bursts of up to max(rate, 1)."""

    def __init__(self, rate: float, max_clients: int = 100_000):
        self.rate, self.burst, self.max_clients = rate, max(rate, 1.0), max_clients
        self.buckets: dict[str, tuple[float, float]] = {}   # client -> (tokens, when counted)

    def wait(self, client: str, now: float) -> float:
        """0.0, taking one request from the client's bucket; or the seconds until the bucket holds one."""
        if len(self.buckets) >= self.max_clients and client not in self.buckets:   # forget the refilled buckets,
            self.buckets = {c: b for c, b in self.buckets.items() if b[0] + (now - b[1]) * self.rate < self.burst}
            if len(self.buckets) >= self.max_clients // 2:   # or all: a prune frees half, so it stays rare
                self.buckets = {}
        tokens, then = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        self.buckets[client] = (tokens - 1 if tokens >= 1 else tokens, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


def guard(token: str, limiter: Optional[RateLimiter], count: Callable[[int], None] = lambda status: None):
    """The aiohttp middleware: 401 without the token on any path but OPEN_PATHS, then 429 past the client's rate (a
    peer worker's forwarded request, proven by the token, is not counted again). A request without the right token
    is refused for that, whatever its rate: the refusal costs what the limiter would, and says what to fix."""
    def reject(status: int, message: str, headers: dict) -> aioweb.Response:
        count(status)
        return aioweb.json_response({"error": message, "status": status}, status=status, headers=headers)

    @aioweb.middleware
    async def middleware(request: aioweb.Request, handler):
        authed = bool(token) and authorized(request.headers.get("Authorization"), token)
        if token and not authed and request.path not in OPEN_PATHS:
            # the live page asks a browser for the token as a password (a navigation cannot send a Bearer header)
            challenge = 'Basic realm="scenestream"' if request.path == LIVE_PAGE else "Bearer"
            return reject(401, "missing or wrong API token (Authorization: Bearer <token>, or Basic with the "
                          "token as the password)", {"WWW-Authenticate": challenge})
        if limiter and not (authed and FORWARDED in request.headers):
            wait = limiter.wait(request.remote or "", time.monotonic())
            if wait:
                return reject(429, "too many requests from this client; retry later",
                              {"Retry-After": str(math.ceil(wait))})
        return await handler(request)
    return middleware


class BadRequest(ValueError):
    pass


def valid_user(user: str, config: StreamConfig) -> bool:
    """Whether the path's user id can be anyone's: an id the event rule refuses (too long, control or unassigned
    characters) never reaches the state, so it is answered as an unknown user without looking."""
    return not isinstance(check_id(user, "user_id", config), Rejection)


def no_other_parameters(query, allowed: frozenset = frozenset()) -> None:
    """A parameter the endpoint does not take is refused (a misspelt `scen=shop` would otherwise be ignored)."""
    other = sorted(set(query) - allowed)
    if other:
        raise BadRequest(f"unknown parameter {other[0][:64]!r}; this endpoint takes {sorted(allowed) or 'none'}")


def parse_query(query, scenes) -> tuple[Optional[str], int, bool]:
    no_other_parameters(query, QUERY)
    scene = query.get("scene")
    if scene is not None and scene not in scenes:
        raise BadRequest(f"unknown scene {scene[:64]!r}; scenes are {list(scenes)}")
    raw_k = query.get("k", "10")
    try:
        k = int(raw_k)
    except (TypeError, ValueError):
        raise BadRequest(f"k must be an integer, got {str(raw_k)[:32]!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be between 1 and {MAX_K}")
    raw_ex = str(query.get("exclude_seen", "true"))
    if raw_ex not in TRUE | FALSE:
        raise BadRequest("exclude_seen must be true or false")
    return scene, k, raw_ex in TRUE


def register(app, service, live: LiveStats, owner_url: Callable[[bytes], Optional[str]], self_url: str,
             catalog_caught_up, token: str = "", rate_limit: float = 0.0,
             broker_problem: Callable[[], Optional[str]] = lambda: None) -> None:
    """service: the MicroBatchService (its `model` is the encoder and live item index in use, swapped as one: each
    request takes it once); live: the counters' recent samples (the live page's charts); owner_url(key): the API URL
    of the worker owning that clicks key (from the consumer group, never from a request); catalog_caught_up():
    readiness of the catalog; token: required of every request but the probes ("" = none); rate_limit: requests per
    second per client (0 = no limit); broker_problem(): None while the Kafka broker answers, else why it does not
    (worker.BrokerWatch): not ready meanwhile."""
    config = service.config
    app.web.web_app.middlewares.append(guard(token, RateLimiter(rate_limit) if rate_limit > 0 else None,
                                             lambda status: service.metrics.requests.labels("any", str(status)).inc()))
    forward_headers = {FORWARDED: self_url, **({"Authorization": f"Bearer {token}"} if token else {})}
    forward_timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S)

    def error(view: View, status: int, message: str) -> Response:
        return view.json({"error": message, "status": status}, status=status)

    def routed(fun):
        """Answer here if this worker owns the user's partition, else forward to the owner and relay its answer."""
        async def handler(self, request: Request, user_id: str) -> Response:
            if request.headers.get(FORWARDED) is None:
                owner = owner_url(user_id.encode("utf-8", "surrogatepass"))
                if owner is None:
                    return error(self, 503, "the user's partition has no owner right now (a rebalance); retry")
                if owner != self_url:
                    try:
                        async with app.http_client.get(owner.rstrip("/") + request.path_qs,
                                                       headers=forward_headers, timeout=forward_timeout) as r:
                            return self.bytes(await r.read(), content_type=r.content_type, status=r.status,
                                              headers={h: r.headers[h] for h in RELAYED if h in r.headers})
                    except (aiohttp.ClientError, TimeoutError):
                        # e.g. the owner died and the group has not noticed yet: retryable, like a rebalance
                        return error(self, 503, "the owner of the user's partition is unreachable; retry")
            return await fun(self, request, user_id)
        handler.__name__ = fun.__name__
        return handler

    def counted(endpoint: str):
        def wrap(fun):
            async def handler(self, request, *args, **kwargs):
                try:
                    response = await fun(self, request, *args, **kwargs)
                except BadRequest as exc:
                    response = error(self, 400, str(exc))
                service.metrics.requests.labels(endpoint, str(response.status)).inc()
                return response
            handler.__name__ = fun.__name__
            return handler
        return wrap

    @app.page("/users/{user_id}/recommendations")
    class Recommendations(View):
        @routed
        @counted("recommendations")
        async def get(self, request: Request, user_id: str) -> Response:
            scene, k, exclude_seen = parse_query(request.query, config.scenes)
            model = service.model   # once: the user's vector and the items it ranks come from one model
            known = valid_user(user_id, config)
            state = service.state_of(user_id) if known else None
            found = await service.user_record(user_id, model) if known else None
            return self.json(recommendation(user_id, scene, k, exclude_seen, state, found, model.index,
                                            service.popularity.popular(), model.version))

    @app.page("/users/{user_id}/interests")
    class Interests(View):
        @routed
        @counted("interests")
        async def get(self, request: Request, user_id: str) -> Response:
            no_other_parameters(request.query)
            found = await service.user_record(user_id) if valid_user(user_id, config) else None
            if found is None:
                return error(self, 404, f"no interests for user {user_id[:200]!r}")
            return self.bytes(record_json(found[0]), content_type="application/json")

    @app.page("/users/{user_id}/history")
    class History(View):
        @routed
        @counted("history")
        async def get(self, request: Request, user_id: str) -> Response:
            no_other_parameters(request.query, frozenset({"n"}))
            try:
                n = int(request.query.get("n", "20"))
            except ValueError:
                n = 0
            if not 1 <= n <= HISTORY_MAX:
                raise BadRequest(f"n must be an integer between 1 and {HISTORY_MAX}")
            state = service.state_of(user_id) if valid_user(user_id, config) else None
            if not state:
                return error(self, 404, f"no history for user {user_id[:200]!r}")
            return self.json({"user_id": user_id, "events": recent_history(state, n)})

    page = files(__package__).joinpath("live_page.html").read_text(encoding="utf-8")

    @app.page(LIVE_PAGE)
    class LivePage(View):
        @counted("live_page")
        async def get(self, request: Request) -> Response:
            no_other_parameters(request.query)
            return self.html(page)

    @app.page("/live/stats")
    class LiveStatsView(View):
        @counted("live_stats")
        async def get(self, request: Request) -> Response:
            no_other_parameters(request.query)
            return self.json({"scenes": list(config.scenes), "model_version": service.model.version,
                              "assigned_partitions": sorted(service.assigned), **live.series()})

    @app.page("/healthz")
    class Health(View):
        @counted("healthz")
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/readyz")
    class Ready(View):
        @counted("readyz")
        async def get(self, request: Request) -> Response:
            broker = broker_problem()
            ready = service.recovered and catalog_caught_up() and broker is None
            model = service.model
            return self.json({"ready": ready, "broker": broker or "ok", "model_version": model.version,
                              "items": len(model.index),
                              "assigned_partitions": sorted(service.assigned),
                              "recovered_partitions": sorted(service.store.held)},
                             status=200 if ready else 503)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            service.metrics.requests.labels("metrics", "200").inc()
            return self.bytes(generate_latest(service.metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])
