"""HTTP API of the worker (Faust web views): recommendations with explanations, interests, health, metrics.

Requests for a user are routed to the worker that owns the user's partition of the clicks topic
(`app.topic_route`), so any worker answers for any user. Input is validated before anything else: bad parameters
get a 4xx with a JSON error, never a 5xx. The API is described in openapi.yaml.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

MAX_K = 1000
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class BadRequest(ValueError):
    pass


def parse_user(user: str, max_chars: int = 128) -> str:
    if not user or len(user) > max_chars or not user.isprintable():
        raise BadRequest(f"user_id must be 1..{max_chars} printable characters")
    return user


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


def popular(service, scene: Optional[str], k: int, exclude: set[str]) -> list[dict]:
    counts = service.popularity[scene].items() if scene else \
        ((i, c) for s in service.popularity.values() for i, c in s.items())
    ranked = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
    index = service.index   # only items in the catalog now: clicks on a deleted item must not bring it back
    out = [{"item_id": i, "scene": index.scene_of(i), "score": float(c)} for i, c in ranked
           if i not in exclude and i in index][:k]
    if len(out) < k:  # cold start: fill from the catalog in a fixed order
        have = {o["item_id"] for o in out} | exclude
        for i, s in zip(service.index.item_ids, service.index.item_scenes):
            if len(out) >= k:
                break
            if (scene is None or s == scene) and i not in have:
                out.append({"item_id": i, "scene": s, "score": 0.0})
    return out


def register(app, service, clicks_topic) -> None:
    scenes = service.encoder.scenes

    def error(view: View, status: int, message: str) -> Response:
        return view.json({"error": message, "status": status}, status=status)

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
        @app.topic_route(topic=clicks_topic, match_info="user_id")
        @counted("recommendations")
        async def get(self, request: Request, user_id: str) -> Response:
            user = parse_user(user_id)
            scene, k, exclude_seen = parse_query(request.query, scenes)
            exclude = service.seen(user, scene) if exclude_seen else set()
            found = await service.user_record(user)
            body = {"user_id": user, "scene": scene, "k": k, "model_version": service.encoder.version}
            if found is None:
                return self.json({**body, "items": popular(service, scene, k, exclude), "fallback": "popular",
                                  "freshness": None, "explanation": None})
            rec, applied_at = found
            vector = np.asarray(rec["fused"][scene] if scene else rec["global"], dtype=np.float32)
            hits = service.index.search(vector[None], scene=scene, k=k, exclude=[exclude])[0]
            target = scene or "global"
            p = service.partition_of(user)
            history = [e for w in (service.store.get(p, user) or {}).values() for e in w] if p is not None else []
            known = [e for e in history if e.item_id in service.index]
            try:
                scores = service.index.scores(vector[None], [e.item_id for e in known])[0] if known else []
            except ValueError:  # a catalog update removed one of them just now: explain without history scores
                known, scores = [], []
            weighed = sorted(zip(map(float, scores), known), key=lambda se: -se[0])[:5]
            return self.json({
                **body,
                "items": [{"item_id": i, "scene": service.index.scene_of(i), "score": s} for i, s in hits],
                "fallback": None,
                "freshness": {"newest_ts": rec["newest_ts"],
                              "applied_ms_ago": None if applied_at is None else int((time.time() - applied_at) * 1000)},
                "explanation": {"scene_weights": rec["weights"][target],
                                "history": [{"item_id": e.item_id, "scene": e.scene, "ts": e.ts, "score": s}
                                            for s, e in weighed]},
            })

    @app.page("/users/{user_id}/interests")
    class Interests(View):
        @app.topic_route(topic=clicks_topic, match_info="user_id")
        @counted("interests")
        async def get(self, request: Request, user_id: str) -> Response:
            user = parse_user(user_id)
            found = await service.user_record(user)
            if found is None:
                return error(self, 404, f"no interests for user {user!r}")
            return self.json(found[0])

    @app.page("/healthz")
    class Health(View):
        @counted("healthz")
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/readyz")
    class Ready(View):
        @counted("readyz")
        async def get(self, request: Request) -> Response:
            ready = service.ready
            return self.json({"ready": ready, "model_version": service.encoder.version, "items": len(service.index),
                              "assigned_partitions": sorted(service.assigned),
                              "recovered_partitions": sorted(service.store.partitions)},
                             status=200 if ready else 503)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            service.metrics.requests.labels("metrics", "200").inc()
            return self.bytes(generate_latest(service.metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])
