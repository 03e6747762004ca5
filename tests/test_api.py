"""The worker's HTTP API against real worker processes and the embedded broker."""
from __future__ import annotations

import json
import re
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scenestream.stream.core.events import Event, encode
from scenestream.stream.core.window import apply_user
from scenestream.stream.live.produce import produce_lines

from .conftest import run
from .test_worker import stream_of

pytestmark = pytest.mark.timeout(600)


def get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            body = r.read()
            return r.status, (json.loads(body) if r.headers.get_content_type() == "application/json" else body)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


def wait_ready(w, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(w.api + "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"worker not ready\n{w.log_text()}")


def recs(w, user, **params):
    return get(f"{w.api}/users/{urllib.parse.quote(user, safe='')}/recommendations?{urllib.parse.urlencode(params)}")


def metric_values(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def _handled(w) -> float:
    """Events the worker applied plus records it refused, by its own counters (updated once a batch is durable)."""
    return _handled_in(metric_values(get(w.api + "/metrics")[1].decode()))


def _handled_in(m: dict) -> float:
    return m.get("scenestream_events_consumed_total", 0) + \
        sum(v for k, v in m.items() if k.startswith("scenestream_events_invalid_total"))


@pytest.fixture(scope="module")
def served(broker, checkpoint, tmp_path_factory):
    from .conftest import WorkerProcess
    w = WorkerProcess(broker, checkpoint, tmp_path_factory.mktemp("api")).start()
    events, lines, bad = stream_of(3000, 50, seed=9)
    wait_ready(w)
    run(produce_lines(broker.bootstrap, w.topics["clicks"], lines, progress=False))
    deadline = time.monotonic() + 60
    while _handled(w) < len(lines):   # every line applied or a dead letter
        assert time.monotonic() < deadline, f"{_handled(w)} of {len(lines)} lines handled in 60 s\n{w.log_text()}"
        time.sleep(0.5)
    yield w, events
    w.kill()


def test_freshness_an_event_shows_in_recommendations_within_five_seconds(served, broker):
    """200 events, 20 users at a time: each is produced, then its user's recommendations are polled until the
    freshness field shows it; the vector (items or explanation) must change too."""
    w, events = served
    users = sorted({e.user_id for e in events})[:20]
    items = [e for e in events if e.scene == "shop"][:50]
    t_base = max(e.ts for e in events) + 10_000
    lags = []
    for round_ in range(10):
        before = {u: recs(w, u, scene="shop", k=10)[1] for u in users}
        fresh = {u: Event(f"fresh-{round_}-{n}", u, items[(round_ * 20 + n) % len(items)].item_id, "shop", "buy",
                          t_base + round_ * 100 + n) for n, u in enumerate(users)}
        t0 = time.monotonic()
        run(produce_lines(broker.bootstrap, w.topics["clicks"], [encode(e) for e in fresh.values()], progress=False))
        pending = set(users)
        while pending:
            for u in sorted(pending):
                status, after = recs(w, u, scene="shop", k=10)
                assert status == 200
                if after["freshness"] and after["freshness"]["newest_ts"] == fresh[u].ts:
                    lags.append(time.monotonic() - t0)
                    assert after["items"] != before[u]["items"] or after["explanation"] != before[u]["explanation"]
                    pending.discard(u)
            assert time.monotonic() - t0 < 5.0, f"{len(pending)} events not reflected within 5 s"
            time.sleep(0.02)
    lags.sort()
    assert len(lags) == 200
    p50, p99 = statistics.median(lags), lags[int(0.99 * (len(lags) - 1))]
    print(f"freshness over {len(lags)} events: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")


def test_bad_inputs_get_4xx_never_5xx(served, checkpoint):
    w, events = served
    user = events[0].user_id
    bad_queries = [{"scene": "podcast"}, {"k": "0"}, {"k": "1001"}, {"k": "-3"}, {"k": "ten"}, {"k": ""},
                   {"k": "1e3"}, {"exclude_seen": "maybe"}, {"scene": ""}, {"k": "99999999999999999999999"}]
    for q in bad_queries:
        status, body = recs(w, user, **q)
        assert 400 <= status < 500 and body["error"], (q, status, body)
    for no_one in ["x" * 129, "a\x01b", "tab\tid", "\u0378"]:   # ids no event can have: unknown users (openapi.yaml)
        quoted = urllib.parse.quote(no_one, safe='')
        status, body = get(f"{w.api}/users/{quoted}/recommendations")
        assert status == 200 and body["fallback"] == "popular" and body["user_id"] == no_one, (no_one, body)
        assert get(f"{w.api}/users/{quoted}/interests")[0] == 404
    # a user the other tests leave alone: each query gets exactly min(k, eligible items in its scope)
    quiet = sorted({e.user_id for e in events})[-1]
    seen = {e.item_id for w in apply_user({}, [e for e in events if e.user_id == quiet], 50)[0].values() for e in w}
    catalog = json.loads((checkpoint / "items.json").read_text())
    for ok in [{"k": "1"}, {"k": "1000"}, {"exclude_seen": "false"}, {"scene": "video", "k": "1000"},
               {"scene": "shop", "k": "1000", "exclude_seen": "false"}]:
        status, body = recs(w, quiet, **ok)
        scope = {i for i, s in catalog if ok.get("scene") in (None, s)}
        eligible = scope - seen if ok.get("exclude_seen", "true") == "true" else scope
        assert status == 200 and len(body["items"]) == min(int(ok.get("k", 10)), len(eligible)), (ok, body)
        assert {i["item_id"] for i in body["items"]} <= eligible
    status, body = recs(w, "someone-new", scene="article", k=7)
    assert status == 200 and body["fallback"] == "popular" and len(body["items"]) == 7
    assert all(i["scene"] == "article" for i in body["items"])
    assert get(f"{w.api}/users/someone-new/interests")[0] == 404
    assert get(w.api + "/healthz") == (200, {"status": "ok"})


def test_exclude_seen_and_interests(served):
    w, events = served
    user = events[-1].user_id
    seen = {e.item_id for e in events if e.user_id == user and e.scene == "video"}
    status, body = recs(w, user, scene="video", k=50)
    assert status == 200 and not seen & {i["item_id"] for i in body["items"]}
    status, rec = get(f"{w.api}/users/{user}/interests")
    assert status == 200 and rec["user_id"] == user and set(rec["fused"]) == {"video", "article", "shop"}


async def _send_aged(bootstrap: str, topic: str, key: bytes, value: bytes, age_s: float) -> None:
    """One record whose broker timestamp is age_s seconds ago, as if it had waited that long upstream."""
    from aiokafka import AIOKafkaProducer
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, timestamp_ms=int((time.time() - age_s) * 1000))
    finally:
        await producer.stop()


def test_metrics_parse_and_move_with_traffic(served, broker):
    w, events = served
    before = metric_values(get(w.api + "/metrics")[1].decode())
    recs(w, events[0].user_id, k=3)
    recs(w, events[0].user_id, k=0)
    user, newest = events[0].user_id, max(e.ts for e in events)
    run(_send_aged(broker.bootstrap, w.topics["clicks"], user.encode(),
                   encode(Event("m-0", user, events[0].item_id, events[0].scene, "view", newest + 99_000)), 30.0))
    run(produce_lines(broker.bootstrap, w.topics["clicks"],
                      [encode(Event("m-1", user, events[0].item_id, events[0].scene, "view", newest + 99_999)),
                       b"not json"], progress=False))
    deadline = time.monotonic() + 30
    while _handled(w) < _handled_in(before) + 3:   # the three records applied or refused, by the counters
        assert time.monotonic() < deadline, "the three records were not handled within 30 s"
        time.sleep(0.2)
    after = metric_values(get(w.api + "/metrics")[1].decode())
    # the latency histogram is in seconds: the aged record adds its 30 s, the two fresh ones a second or two
    added = after["scenestream_event_to_publish_seconds_sum"] - before["scenestream_event_to_publish_seconds_sum"]
    assert 30.0 <= added <= 40.0, added
    # and it is 30 s old before the worker takes it up: the wait is the broker's share, not the worker's
    waited = after["scenestream_event_to_batch_seconds_sum"] - before["scenestream_event_to_batch_seconds_sum"]
    assert 30.0 <= waited <= added, (waited, added)
    # the user's window grew by new events only: encoded against the cached rows, not whole
    assert after["scenestream_encoder_cache_lookups_total{outcome=extend}"] > \
        before.get("scenestream_encoder_cache_lookups_total{outcome=extend}", 0)
    assert after["scenestream_events_consumed_total"] > before["scenestream_events_consumed_total"]
    assert after["scenestream_events_invalid_total{reason=bad_json}"] > \
        before.get("scenestream_events_invalid_total{reason=bad_json}", 0)
    assert after["scenestream_http_requests_total{endpoint=recommendations,status=200}"] > \
        before.get("scenestream_http_requests_total{endpoint=recommendations,status=200}", 0)
    assert after["scenestream_http_requests_total{endpoint=recommendations,status=400}"] >= 1
    assert after["scenestream_event_to_publish_seconds_count"] > before["scenestream_event_to_publish_seconds_count"]
    assert "scenestream_batch_size_count" in after and "scenestream_encode_seconds_count" in after


def test_two_workers_answer_the_same_for_every_user(broker, checkpoint, tmp_path):
    """Two workers in one group over 4 partitions: each owns some users; either answers for all (forwarding)."""
    from .conftest import WorkerProcess
    a = WorkerProcess(broker, checkpoint, tmp_path, app_id="pair").start()
    b = WorkerProcess(broker, checkpoint, tmp_path, app_id="pair").start()
    try:
        wait_ready(a)
        wait_ready(b)
        events, lines, _ = stream_of(2000, 0, seed=12)
        run(produce_lines(broker.bootstrap, a.topics["clicks"], lines, progress=False))
        users = sorted({e.user_id for e in events})
        newest = {u: max(e.ts for e in events if e.user_id == u) for u in users}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all((recs(a, u, k=5)[1].get("freshness") or {}).get("newest_ts") == newest[u] for u in users):
                break
            time.sleep(1.0)
        owned = {w: get(w.api + "/readyz")[1]["assigned_partitions"] for w in (a, b)}
        assert owned[a] and owned[b] and not set(owned[a]) & set(owned[b]), owned   # both own partitions
        for u in users:
            for params in ({"k": 5}, {"scene": "video", "k": 5}):
                sa, ra = recs(a, u, **params)
                sb, rb = recs(b, u, **params)
                assert sa == sb == 200 and ra["fallback"] is None
                assert ra["items"] == rb["items"] and ra["freshness"]["newest_ts"] == newest[u]
    finally:
        a.kill()
        b.kill()


DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "scenestream.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",),
            "summary": ("", "_sum", "_count")}


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can carry: each family's samples, and the names its type implies (a
    labelled counter with no sample yet still declares itself)."""
    names = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        names |= {fam.name + suffix for suffix in SUFFIXES.get(fam.type, ("",))}
    return names


def dashboard_problems(dashboard: dict, exported: set[str]) -> list[str]:
    """A panel whose queries name no worker metric, or a metric no worker exports (a typo, a renamed metric)."""
    problems = []
    for panel in dashboard["panels"]:
        named = [m for t in panel["targets"] for m in re.findall(r"\b(?:scenestream|process)_[a-z_]+", t["expr"])]
        if not named:
            problems.append(f"{panel['title']!r}: no worker metric in its queries")
        problems += [f"{panel['title']!r}: {m} is not exported" for m in named if m not in exported]
    for var in dashboard["templating"]["list"]:
        problems += [f"variable {var['name']}: {m} is not exported"
                     for m in re.findall(r"\b(?:scenestream|process)_[a-z_]+", var["query"]) if m not in exported]
    return problems


def test_every_grafana_panel_queries_metrics_the_worker_exports(served):
    """deploy/grafana's dashboard against a running worker's /metrics (after events and dead letters)."""
    w, _ = served
    exported = exported_names(get(w.api + "/metrics")[1].decode())
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard_problems(dashboard, exported) == []
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for shown in ("events applied", "lag", "latency", "dead letters", "batch size", "encode time", "rss"):
        assert shown in titles, shown
    broken = json.loads(DASHBOARD.read_text())   # the check can fail: a renamed metric, a query with none
    broken["panels"][0]["targets"][0]["expr"] = "rate(scenestream_events_consumd_total[1m])"
    broken["panels"][1]["targets"] = [{"expr": "vector(1)"}]
    assert len(dashboard_problems(broken, exported)) == 2
