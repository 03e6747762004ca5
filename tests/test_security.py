"""The API's guard (token, rate limit, bind rules) and forwarding between workers, in-process and against two real
workers with a token; and schemathesis against openapi.yaml on one of them."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from aiohttp import web as aioweb
from aiohttp.test_utils import TestClient, TestServer

from scenestream.index import ItemIndex
from scenestream.stream.core.config import DEFAULT_SCENES
from scenestream.stream.core.popularity import merge_partitions
from scenestream.stream.live.produce import produce_lines
from scenestream.stream.live.recommend import POPULAR_TOP, popular_items
from scenestream.stream.live.config import bind_problem, is_loopback
from scenestream.stream.live.web import FORWARDED, RateLimiter, authorized, guard

from .conftest import ROOT, SMALL, WorkerProcess, run
from .test_api import wait_ready
from .test_worker import stream_of

pytestmark = pytest.mark.timeout(600)
TOKEN = "s3cret-Token-4f9a"
PROTECTED = ["/users/{u}/recommendations?k=3", "/users/{u}/interests", "/users/{u}/history", "/", "/live/stats",
             "/metrics", "/router/", "/table/", "/graph/", "/stats/", "/assignment/"]   # the last five are Faust's own
# what they answer with the token where not 200: routes this Faust does not serve (the token is asked for first)
ANSWERED = {"/graph/": 404, "/stats/": 404, "/assignment/": 404}


def call(url: str, token: str | None = TOKEN, headers: dict | None = None) -> tuple[int, dict, bytes]:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers={**auth, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ---- the functional core --------------------------------------------------------------------------------------

def test_rate_limiter_is_a_token_bucket_per_client():
    r = RateLimiter(2.0)
    assert [r.wait("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.5]   # a burst of 2, then half a second to wait
    assert r.wait("b", 0.0) == 0.0                                    # another client has its own bucket
    assert r.wait("a", 0.5) == 0.0 and r.wait("a", 0.5) > 0           # refilled at 2 per second
    small = RateLimiter(1.0, max_clients=2)
    small.wait("x", 0.0)
    small.wait("y", 0.0)
    assert small.wait("z", 10.0) == 0.0 and set(small.buckets) == {"z"}   # refilled buckets are forgotten
    small.wait("x", 10.0)
    assert small.wait("y", 10.0) == 0.0 and set(small.buckets) == {"y"}   # and all when none is refilled


def test_token_bind_and_loopback_rules():
    assert authorized(f"Bearer {TOKEN}", TOKEN)
    assert not any(authorized(h, TOKEN) for h in (None, "", TOKEN, f"bearer {TOKEN}", f"Bearer {TOKEN}x",
                                                  "Bearer \udcff", f"Basic {TOKEN}"))
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.5", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.1.2.3", "worker-a", ""]))
    assert bind_problem("127.0.0.1", "") is None and bind_problem("0.0.0.0", "http://10.1.2.3:6066") is None
    assert "--canonical-url" in bind_problem("0.0.0.0", "") and "POD_IP" in bind_problem("10.1.2.3", "")


def test_guard_in_process():
    """The middleware on a bare aiohttp app: 401 without the token but on the probes, whatever the rate; 429 with
    Retry-After past the rate; a peer's forwarded request (with the token) not counted."""
    async def main():
        async def ok_view(request):
            return aioweb.json_response({"ok": True})
        app = aioweb.Application(middlewares=[guard(TOKEN, RateLimiter(3.0))])
        for path in ("/healthz", "/data"):
            app.router.add_get(path, ok_view)
        async with TestClient(TestServer(app)) as client:
            ok = {"Authorization": f"Bearer {TOKEN}"}
            r = await client.get("/data")
            assert r.status == 401 and (await r.json())["status"] == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert (await client.get("/data", headers={"Authorization": "Bearer nope"})).status == 401
            assert (await client.get("/healthz")).status == 200          # the 401s took nothing of the bucket
            assert (await client.get("/healthz")).status == 200
            assert (await client.get("/data", headers=ok)).status == 200  # third request: the bucket is empty now
            r = await client.get("/data", headers=ok)
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1 and (await r.json())["error"]
            assert (await client.get("/data", headers={"Authorization": "Bearer nope"})).status == 401
            for _ in range(5):   # forwarded by a peer (it holds the token): its client was counted there
                assert (await client.get("/data", headers={**ok, FORWARDED: "http://peer"})).status == 200
            # the hop header without the token is no pass
            assert (await client.get("/data", headers={FORWARDED: "http://peer"})).status == 401
    asyncio.run(main())


# ---- two real workers with a token ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(broker, checkpoint, tmp_path_factory):
    """Two workers in one group, the token from SCENESTREAM_API_TOKEN; b limits clients to 5 requests/s."""
    log_dir = tmp_path_factory.mktemp("security")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SCENESTREAM_API_TOKEN", TOKEN)
        (log_dir / "a").mkdir()
        (log_dir / "b").mkdir()
        a = WorkerProcess(broker, checkpoint, log_dir / "a", app_id="guarded").start()
        b = WorkerProcess(broker, checkpoint, log_dir / "b", app_id="guarded", extra=("--rate-limit", "5")).start()
    try:
        wait_ready(a)
        wait_ready(b)
        events, lines, _ = stream_of(600, 0, seed=21)
        run(produce_lines(broker.bootstrap, a.topics["clicks"], lines, progress=False))
        users = sorted({e.user_id for e in events})
        owned = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(owned) < len(users):
            for u in users:
                status, _, body = call(f"{b.api}/users/{u}/interests", headers={FORWARDED: "test"})   # b's own only
                if status == 200:
                    owned[u] = b
                status, _, body = call(f"{a.api}/users/{u}/interests", headers={FORWARDED: "test"})
                if status == 200:
                    owned[u] = a
            time.sleep(1.0)
        assert {a, b} <= set(owned.values()), owned   # both own users
        yield a, b, owned
    finally:
        a.kill()
        b.kill()


def test_every_protected_endpoint_needs_the_token(pair):
    a, b, owned = pair
    user = next(iter(owned))
    for path in PROTECTED:
        url = a.api + path.format(u=user)
        for token in (None, "wrong", TOKEN[:-1]):
            status, headers, body = call(url, token)
            assert status == 401 and b'"status":401' in body.replace(b" ", b""), (path, token, status, body)
        status = call(url)[0]
        assert status == ANSWERED.get(path, 200), (path, status)   # with the token: answered
    assert call(a.api + "/healthz", None)[0] == 200 and call(a.api + "/readyz", None)[0] == 200


def test_forwarded_requests_carry_the_token_and_never_hop_twice(pair):
    a, b, owned = pair
    theirs = [u for u, w in owned.items() if w is b][:5]
    for u in theirs:
        # answered by b through a: b requires the token too, so a sent it
        status, _, via_a = call(f"{a.api}/users/{u}/recommendations?k=5")
        assert status == 200 and b'"fallback":null' in via_a, via_a
        assert call(f"{a.api}/users/{u}/recommendations?k=5", None)[0] == 401   # not forwarded without it
        # a request that already carries the hop header is answered where it lands: a has no vector for the user
        status, _, here = call(f"{a.api}/users/{u}/recommendations?k=5", headers={FORWARDED: "http://elsewhere"})
        assert status == 200 and b'"fallback":"popular"' in here
    # many forwarded requests in a row: b's limit (5/s) does not count its peer's (token-bearing) requests
    assert all(call(f"{a.api}/users/{theirs[0]}/interests")[0] == 200 for _ in range(30))


def test_rate_limit_answers_429_with_retry_after(pair):
    a, b, owned = pair
    time.sleep(1.5)   # b's bucket full again
    got = [call(b.api + "/healthz", None) for _ in range(20)]
    limited = [(s, h) for s, h, _ in got if s == 429]
    assert limited and all(int(h["Retry-After"]) >= 1 for _, h in limited), [s for s, _, _ in got]
    assert [s for s, _, _ in got][:5] == [200] * 5


def test_schemathesis_with_every_check_finds_nothing(pair):
    """`schemathesis run openapi.yaml --checks all` against worker a, with its token (what docs/operations.md tells
    a user to run): generated requests, valid and invalid, some without the token; every response as the spec
    says, no 5xx, and the server accepts exactly what the spec allows. The spec's scenes are the synthetic data's,
    which the test model has."""
    a, _, _ = pair
    assert tuple(yaml.safe_load((ROOT / "openapi.yaml").read_text())["paths"]["/users/{user_id}/recommendations"]
                 ["get"]["parameters"][1]["schema"]["enum"]) == SMALL.scenes == DEFAULT_SCENES
    cli = Path(sys.executable).with_name("schemathesis")
    out = subprocess.run([str(cli), "run", "openapi.yaml", "--checks", "all", "--url", a.api, "--seed", "1",
                          "-H", f"Authorization: Bearer {TOKEN}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0 and "passed" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]


def test_forwarding_times_out_into_a_503_and_no_token_in_logs(pair):
    """Last: b frozen (SIGSTOP), a's forwarded request gives up within its 3 s timeout with a JSON 503."""
    a, b, owned = pair
    user = next(u for u, w in owned.items() if w is b)
    b.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status, _, body = call(f"{a.api}/users/{urllib.parse.quote(user)}/recommendations")
        took = time.monotonic() - t0
    finally:
        b.proc.send_signal(signal.SIGCONT)
    assert status == 503 and b"unreachable" in body and 2.0 <= took <= 5.0, (status, body, took)
    logs = "".join(p.read_text(errors="replace") for w in (a, b) for p in w.log_dir.glob("*.log"))
    assert "consuming" in logs and TOKEN not in logs


def test_the_popular_fallback_ranks_once_per_popularity_not_per_request(monkeypatch):
    """A flood of fallback requests reads one ranked top per scene; the answers equal ranking every count, also
    when exclusions eat the whole top."""
    items = [f"i{n:05d}" for n in range(POPULAR_TOP + 500)]
    index = ItemIndex.build(items, ["video"] * len(items), np.eye(len(items), 8, dtype=np.float32))
    pop = merge_partitions([{"video": {i: 1 + n % 997 for n, i in enumerate(items)}}])
    want = [i for i, _ in pop.ranked("video")]
    calls = []
    ranked = pop.ranked
    monkeypatch.setattr(pop, "ranked", lambda *a, **kw: calls.append(a) or ranked(*a, **kw))
    for n in range(50):
        assert [o["item_id"] for o in popular_items(pop, index, "video", 10, {want[n]})] == \
            [i for i in want if i != want[n]][:10]
    assert len(calls) == 1
    most = set(want[:POPULAR_TOP - 5])
    assert [o["item_id"] for o in popular_items(pop, index, "video", 10, most)] == \
        [i for i in want if i not in most][:10]


def test_a_public_bind_needs_a_canonical_url_and_warns_without_a_token(broker, checkpoint, tmp_path):
    from click.testing import CliRunner

    from scenestream.stream.cli import main
    got = CliRunner().invoke(main, ["worker", "--broker", broker.url, "--checkpoint", str(checkpoint),
                                    "--web-host", "0.0.0.0"], env={"SCENESTREAM_WORKER_CANONICAL_URL": ""})
    assert got.exit_code == 2 and "--canonical-url" in got.output and "POD_IP" in got.output, got.output
    w = WorkerProcess(broker, checkpoint, tmp_path)
    w.extra = ("--web-host", "0.0.0.0", "--canonical-url", f"http://127.0.0.1:{w.web_port}")
    w.start()
    try:
        deadline = time.monotonic() + 90
        while "with no token" not in w.log_text() and time.monotonic() < deadline and w.proc.poll() is None:
            time.sleep(0.5)
        assert "listens on 0.0.0.0 with no token" in w.log_text(), w.log_text()
    finally:
        w.kill()
