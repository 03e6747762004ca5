"""The live page at /: its ring buffer and token parsing in-process, then the page in a real headless Chromium
against a real worker (with a token) and the embedded broker, driven over the Chrome DevTools Protocol."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web as aioweb
from aiohttp.test_utils import TestClient, TestServer

from scenestream.stream.core.events import Event, encode
from scenestream.stream.core.window import Window
from scenestream.stream.live.live_stats import LiveStats, Sample, quantile
from scenestream.stream.live.produce import produce_lines
from scenestream.stream.live.recommend import recent_history
from scenestream.stream.live.web import authorized, guard

from .conftest import ROOT, WorkerProcess, run
from .test_security import TOKEN, call
from .test_worker import stream_of
from .test_api import wait_ready

pytestmark = pytest.mark.timeout(600)
PAGE = ROOT / "stream" / "live" / "live_page.html"
SCREENSHOT = ROOT / "docs" / "live-page.png"


def basic(password: str, user: str = "live") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---- the functional core --------------------------------------------------------------------------------------

def test_quantile_interpolates_within_buckets():
    bounds = [1.0, 2.0, 4.0]
    assert quantile(bounds, [0, 10, 0, 0], 0.5) == 1.5                  # halfway through (1, 2]
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == 0.5                  # the first bucket starts at 0
    assert quantile(bounds, [5, 0, 0, 5], 0.99) == 4.0                  # past the last bound: the last bound
    assert quantile(bounds, [0, 0, 4, 0], 0.99) == pytest.approx(2 + 2 * 0.99)
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None                  # nothing published in the interval


def test_live_stats_are_differences_between_samples_and_keep_the_last_ones():
    stats = LiveStats([1.0, 2.0], kept=3)
    assert stats.series()["events_per_s"] == [] and stats.series()["totals"] == {"events": 0, "dead_letters": 0}
    stats.add(Sample(100.0, 10, {}, np.array([0, 0, 0]), 0))
    stats.add(Sample(102.0, 30, {"bad_json": 1}, np.array([0, 4, 0]), 7))
    stats.add(Sample(103.0, 30, {"bad_json": 1, "schema": 2}, np.array([0, 4, 0]), 0))
    s = stats.series()
    assert orjson.loads(orjson.dumps(s)) == s   # plain numbers (no numpy scalars), as /live/stats sends them
    assert s["at"] == [102.0, 103.0] and s["events_per_s"] == [10.0, 0.0] and s["lag"] == [7, 0]
    assert s["freshness_p50_s"] == [1.5, None] and s["freshness_p99_s"] == [1.99, None]
    assert s["dead_letters"] == {"bad_json": [1, 0], "schema": [0, 2]}
    assert s["totals"] == {"events": 30, "dead_letters": 3}
    stats.add(Sample(104.0, 35, {"bad_json": 1, "schema": 2}, np.array([1, 4, 0]), 0))
    assert stats.series()["at"] == [103.0, 104.0]   # the oldest sample left


def test_recent_history_is_newest_first_over_all_scenes():
    def ev(n, scene, ts):
        return Event(f"e{n}", "", f"i{n}", scene, "view", ts)
    state = {"video": Window.of([ev(1, "video", 10), ev(3, "video", 30)]), "shop": Window.of([ev(2, "shop", 20)])}
    assert [e["event_id"] for e in recent_history(state, 2)] == ["e3", "e2"]
    assert recent_history(state, 9)[-1] == {"event_id": "e1", "item_id": "i1", "scene": "video", "action": "view",
                                            "ts": 10}


def test_basic_credentials_carry_the_token_as_the_password():
    assert authorized(basic(TOKEN), TOKEN) and authorized(basic(TOKEN, user=""), TOKEN)
    assert authorized(basic(TOKEN, user="any:one"), TOKEN) is False   # the password is what follows the first ':'
    assert not any(authorized(h, TOKEN) for h in (basic(TOKEN[:-1]), basic(TOKEN + "x"), basic(""),
                                                  "Basic " + base64.b64encode(TOKEN.encode()).decode(),   # no ':'
                                                  "Basic !!!", "Basic " + base64.b64encode(b"u:\xff").decode(),
                                                  f"basic {basic(TOKEN)[6:]}", f"Basic {TOKEN}"))


def test_the_page_asks_a_browser_for_the_token():
    """/ without credentials: 401 with a Basic challenge (a browser prompts); other paths keep the Bearer one;
    Basic credentials with the token pass everywhere, like the Bearer header."""
    async def main():
        async def ok_view(request):
            return aioweb.json_response({"ok": True})
        app = aioweb.Application(middlewares=[guard(TOKEN, None)])
        for path in ("/", "/data"):
            app.router.add_get(path, ok_view)
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/")
            assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="scenestream"'
            assert (await client.get("/data")).headers["WWW-Authenticate"] == "Bearer"
            assert (await client.get("/", headers={"Authorization": basic("nope")})).status == 401
            for path in ("/", "/data"):
                for header in (basic(TOKEN), f"Bearer {TOKEN}"):
                    assert (await client.get(path, headers={"Authorization": header})).status == 200
    asyncio.run(main())


def test_the_page_is_self_contained():
    """No URL the browser would fetch: the only absolute URL is the SVG namespace."""
    html = PAGE.read_text()
    assert set(re.findall(r"\w+://[^\s\"'`)]*", html)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", html)


# ---- a real Chromium against a real worker --------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed when missing (the suite runs as root on Debian); never skipped."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get"):
        subprocess.run("apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium",
                       shell=True, check=False, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("the live page test needs Debian's `chromium` on PATH and could not install it "
                    "(apt-get install -y chromium, as root)")
    return found


class Page:
    """One tab of a headless Chromium, spoken to over the DevTools Protocol (a websocket of JSON commands). While
    `password` is set, it answers the browser's credentials prompt (Fetch.authRequired) as a user would."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.ids, self.password = ws, 0, None

    async def _command(self, method: str, params: dict) -> int:
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        return self.ids

    async def send(self, method: str, **params) -> dict:
        sent = await self._command(method, params)
        while True:
            msg = json.loads((await self.ws.receive(timeout=30)).data)
            if msg.get("id") == sent:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            if msg.get("method") == "Fetch.authRequired":
                answer = {"response": "ProvideCredentials", "username": "live", "password": self.password}
                await self._command("Fetch.continueWithAuth", {"requestId": msg["params"]["requestId"],
                                                               "authChallengeResponse": answer})
            elif msg.get("method") == "Fetch.requestPaused":
                await self._command("Fetch.continueRequest", {"requestId": msg["params"]["requestId"]})

    async def js(self, expression: str):
        got = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expression}: {got['exceptionDetails']}")
        return got["result"].get("value")

    async def until(self, expression: str, what: str, timeout: float = 20.0):
        """Poll a JS expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := await self.js(expression)):
            if time.monotonic() > deadline:
                shown = await self.js("document.body.innerText")
                raise AssertionError(f"{what}: not within {timeout:g} s; the page shows:\n{shown}")
            await asyncio.sleep(0.25)
        return value


async def open_page(chromium: str, profile: str, session: aiohttp.ClientSession):
    """Launch headless Chromium; its first tab, and the process."""
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    lines = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode(errors="replace")
        lines.append(line)
        if not line:
            raise AssertionError("chromium exited before it listened:\n" + "".join(lines))
        if m := re.search(r"DevTools listening on (ws://[^/]+)/", line):
            break
    asyncio.ensure_future(proc.stderr.read())   # drained, so the browser never blocks on a full pipe
    async with session.get(m.group(1).replace("ws://", "http://") + "/json/list") as r:
        tab = next(t for t in await r.json() if t["type"] == "page")
    return Page(await session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0)), proc


@pytest.fixture(scope="module")
def live(broker, checkpoint, tmp_path_factory):
    """A worker with a token, fed events and a few malformed lines (dead letters)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SCENESTREAM_API_TOKEN", TOKEN)
        w = WorkerProcess(broker, checkpoint, tmp_path_factory.mktemp("live")).start()
    try:
        wait_ready(w)
        events, lines, _ = stream_of(600, 20, seed=33)
        run(produce_lines(broker.bootstrap, w.topics["clicks"], lines, progress=False))
        deadline = time.monotonic() + 60
        while True:   # every line applied or a dead letter, by the page's own totals
            totals = json.loads(call(w.api + "/live/stats")[2])["totals"]
            if totals["events"] + totals["dead_letters"] >= len(lines):
                break
            assert time.monotonic() < deadline, f"{totals} of {len(lines)} lines handled in 60 s\n{w.log_text()}"
            time.sleep(0.3)
        yield w, events
    finally:
        w.kill()


def test_the_page_and_its_data_need_the_token(live):
    w, events = live
    status, headers, _ = call(w.api + "/", None)
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="scenestream"'
    status, headers, body = call(w.api + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"SceneStream live" in body
    assert call(w.api + "/", None, {"Authorization": basic(TOKEN)})[0] == 200
    for path in ("/live/stats", f"/users/{events[0].user_id}/history"):
        assert call(w.api + path, None)[0] == 401
        assert call(w.api + path, None, {"Authorization": basic(TOKEN)})[0] == 200
    status, _, body = call(w.api + f"/users/{events[0].user_id}/history?n=0")
    assert status == 400 and b"n must be" in body
    assert call(w.api + "/users/nobody-here/history")[0] == 404


def test_the_page_in_chromium_renders_and_follows_the_events(live, broker, chromium, tmp_path):
    """Chromium opens / with the token as the Basic password; the charts draw from /live/stats; a user typed in
    shows weights, recommendations and history; then a burst of events for that user and others: the events/s
    figure, the dead letters and the user's history and weights change in the same page session."""
    w, events = live
    user = events[-1].user_id
    newest = max(e.ts for e in events)
    ours = [e for e in events if e.user_id == user]
    fresh = [Event(f"live-{n}", user, ours[n % len(ours)].item_id, ours[n % len(ours)].scene, "buy", newest + 1000 + n)
             for n in range(6)]
    others = [e._replace(ts=newest + i) for i, e in enumerate(stream_of(1500, 0, seed=34)[0]) if e.user_id != user]
    burst = [encode(e) for e in fresh + others] + [b"not json", b"{}"]

    async def main():
        async with aiohttp.ClientSession() as session:
            page, proc = await open_page(chromium, str(tmp_path / "profile"), session)
            try:
                page.password = TOKEN   # typed into the prompt that the 401's Basic challenge brings up
                await page.send("Fetch.enable", handleAuthRequests=True)
                await page.send("Page.navigate", url=w.api + "/")
                await page.until("document.title === 'SceneStream live'", "the page loads")
                await page.send("Fetch.disable")   # asked once: the browser sends the credentials from now on
                await page.until("Number(document.querySelector('#chart-events path')?.dataset.points) >= 3",
                                 "the events/s chart draws its samples")
                for fig in ("events-per-s", "lag", "p50", "p99", "dead-letters"):
                    await page.until(f"/^[0-9.]+$/.test(document.getElementById('{fig}').textContent)",
                                     f"#{fig} shows a number")
                assert await page.js("document.querySelectorAll('#chart-freshness path').length") == 2
                assert await page.js("document.querySelectorAll('#chart-dead rect').length") >= 1   # the 20 bad lines
                await page.until("document.getElementById('events-per-s').textContent === '0.0'",
                                 "the first events are handled (events/s back to 0)", 60)
                dead_before = int(await page.js("document.getElementById('dead-letters').textContent"))

                await page.js("document.getElementById('user-id').focus()")
                await page.send("Input.insertText", text=user)
                await page.js("document.getElementById('user-form').requestSubmit()")
                await page.until(f"document.querySelector('#history li')?.dataset.eventId === "
                                 f"{json.dumps(ours[-1].event_id)}", "the user's history shows")
                weights = "JSON.stringify([...document.querySelectorAll('#weights td')].map(c => c.dataset.weight))"
                await page.until("document.querySelectorAll('#weights td').length >= 9", "the user's weights show")
                weights_before = await page.js(weights)
                assert await page.js("document.querySelectorAll('#recs ol li').length") >= 3

                # over ~5 s, so that the charts show a stretch of traffic (and the screenshot too)
                await produce_lines(broker.bootstrap, w.topics["clicks"], burst, rate=300, progress=False)
                await page.until("Number(document.getElementById('events-per-s').textContent) > 0",
                                 "events/s rises with the burst")
                await page.until(f"document.querySelector('#history li')?.dataset.eventId === "
                                 f"{json.dumps(fresh[-1].event_id)}", "the user's new events show in the history")
                await page.until(f"{weights} !== {json.dumps(weights_before)}", "the user's weights change")
                await page.until(f"Number(document.getElementById('dead-letters').textContent) >= {dead_before + 2}",
                                 "the new dead letters are counted")
                shot = await page.send("Page.captureScreenshot", format="png")
                SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
            finally:
                proc.kill()
                await proc.wait()
    asyncio.run(main())
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
