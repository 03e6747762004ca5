"""HTTP views of the worker (Faust web): recommendations with explanations, interests, health, metrics.

Views parse and validate a request, then call recommend.py and the micro-batch service; no recommendation logic
lives here. Requests for a user are forwarded to the worker that owns the user's partition of the clicks topic
(the group's partition -> URL table, stream/feeder.py), so any worker answers for any user. Bad parameters get a
4xx with a JSON error, never a 5xx. The API is described in openapi.yaml.
"""
from __future__ import annotations

from typing import Callable, Optional

import aiohttp
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .core.batch import record_json
from .core.config import StreamConfig
from .core.events import Rejection, check_id
from .recommend import recommendation

MAX_K = 1000
FORWARDED = "X-SceneStream-Forwarded-By"   # a forwarded request is answered where it lands: never forwarded twice
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class BadRequest(ValueError):
    pass


def parse_user(user: str, config: StreamConfig) -> str:
    checked = check_id(user, "user_id", config)
    if isinstance(checked, Rejection):
        raise BadRequest(checked.detail)
    return checked


def parse_query(query, scenes) -> tuple[Optional[str], int, bool]:
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
    raw_ex = str(query.get("exclude_seen", "true")).lower()
    if raw_ex not in TRUE | FALSE:
        raise BadRequest("exclude_seen must be true or false")
    return scene, k, raw_ex in TRUE


def register(app, service, owner_url: Callable[[bytes], Optional[str]], self_url: str, catalog_caught_up) -> None:
    """service: the MicroBatchService (its `model` is the encoder and live item index in use, swapped as one: each
    request takes it once); owner_url(key): the API URL of the worker owning that clicks key; catalog_caught_up():
    readiness of the catalog."""
    config = service.config

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
                                                       headers={FORWARDED: self_url}) as r:
                            return self.bytes(await r.read(), content_type=r.content_type, status=r.status)
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
            user = parse_user(user_id, config)
            scene, k, exclude_seen = parse_query(request.query, config.scenes)
            model = service.model   # once: the user's vector and the items it ranks come from one model
            state = service.state_of(user)
            found = await service.user_record(user, model)
            return self.json(recommendation(user, scene, k, exclude_seen, state, found, model.index,
                                            service.popular(), model.version))

    @app.page("/users/{user_id}/interests")
    class Interests(View):
        @routed
        @counted("interests")
        async def get(self, request: Request, user_id: str) -> Response:
            user = parse_user(user_id, config)
            found = await service.user_record(user)
            if found is None:
                return error(self, 404, f"no interests for user {user!r}")
            return self.bytes(record_json(found[0]), content_type="application/json")

    @app.page("/healthz")
    class Health(View):
        @counted("healthz")
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/readyz")
    class Ready(View):
        @counted("readyz")
        async def get(self, request: Request) -> Response:
            ready = service.recovered and catalog_caught_up()
            model = service.model
            return self.json({"ready": ready, "model_version": model.version, "items": len(model.index),
                              "assigned_partitions": sorted(service.assigned),
                              "recovered_partitions": sorted(service.store.partitions)},
                             status=200 if ready else 503)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            service.metrics.requests.labels("metrics", "200").inc()
            return self.bytes(generate_latest(service.metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])
