"""`scenestream run`, the main job, as a user runs it: it serves recommendations, and Ctrl-C leaves nothing behind."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from scenestream.stream.local.processes import free_port

pytestmark = pytest.mark.timeout(400)


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def running(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "--", pattern], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_the_shipped_demo_model_is_the_synthetic_datas():
    """The demo model in the package (stream/local/demo_model) is what build_demo_model makes of the seeded synthetic
    data: its vocabulary, scenes, actions and window, and its version is the hash of its weights (load_checkpoint)."""
    from scenestream.model.checkpoint import load_checkpoint
    from scenestream.model.vocab import ItemVocab
    from scenestream.stream.core.config import DEFAULT_ACTIONS
    from scenestream.stream.local.run import DEMO_MODEL, demo_events
    from scenestream.stream.offline.leave_one_out import timelines
    ckpt = load_checkpoint(DEMO_MODEL)
    events, scenes = demo_events()
    assert list(ckpt.scenes) == scenes and list(ckpt.actions) == list(DEFAULT_ACTIONS) and ckpt.window == 50
    assert ckpt.vocab.to_json() == ItemVocab.from_events(e for tl in timelines(events).values() for e in tl).to_json()
    assert ckpt.meta["dataset"] == "synthetic-demo"


def test_run_serves_recommendations_and_ctrl_c_stops_everything(tmp_path):
    """The README's first command as a new user runs it: no --checkpoint (the shipped demo model, no training), an
    empty cache."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scenestream.stream.cli", "run", "--port", str(port), "--broker-port", "0",
                             "--rate", "1000", "--log", str(tmp_path / "w.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "SCENESTREAM_CACHE": str(tmp_path / "cache")})
    banner = []
    try:
        t0 = time.monotonic()
        for line in proc.stdout:
            banner.append(line)
            if "Ctrl-C stops everything" in line:
                break
            assert time.monotonic() - t0 < 180, "".join(banner)
        text = "".join(banner)
        assert "SceneStream is running" in text, text
        assert "training" not in text, text   # the shipped model served: nothing trained first
        broker_port = re.search(r"broker\s+kafka://127\.0\.0\.1:(\d+)", text).group(1)
        example = re.search(r"curl '([^']+recommendations[^']+)'", text).group(1)
        deadline = time.monotonic() + 30
        while True:  # the example user's first events arrive within seconds of the stream starting
            status, body = get(example)
            assert status == 200, body
            if body["fallback"] is None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert body["fallback"] is None and len(body["items"]) == 5
        assert body["freshness"]["newest_ts"] > 0 and body["explanation"]["scene_weights"]
        assert time.monotonic() - t0 < 180
        assert running(f"--web-port {port}") and running(f"127.0.0.1:{broker_port}")
        os.killpg(proc.pid, signal.SIGINT)                       # what Ctrl-C in a terminal does
        assert proc.wait(30) == 0
        time.sleep(1.0)
        assert not running(f"--web-port {port}"), "worker left behind"
        assert not running(f"127.0.0.1:{broker_port}"), "broker left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
