"""The user's offline loop, as real processes: generate -> train -> replay, and what each writes."""
import json
import subprocess
from collections import Counter
import sys

import numpy as np
import pytest

from scenestream.stream.core.config import StreamConfig
from scenestream.stream.core.events import Event, decode, encode
from scenestream.stream.offline.logs import load_events, read_raw, time_cutoff

CLI = [sys.executable, "-m", "scenestream.stream.cli"]


def run(*args, check=True):
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


WINDOW = 50


def append_one_late_event(log) -> Event:
    """Append an event older than a full window of its (user, scene), so exactly one event is late. The generated
    log is in time order and no (user, scene) has more than L events among any 1000 consecutive lines (both
    checked here), so no other event can be late or pushed out of its own micro-batch."""
    events = load_events(input_path=log).events
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:]))
    for lo in range(0, len(events), 250):
        assert max(Counter((e.user_id, e.scene) for e in events[lo:lo + 1000]).values()) <= WINDOW
    cut = time_cutoff(events, 0.8)
    (user, scene), n = Counter((e.user_id, e.scene) for e in events if e.ts < cut).most_common(1)[0]
    assert n > WINDOW
    mine = [e for e in events if (e.user_id, e.scene) == (user, scene)]
    late = Event("late-1", user, mine[0].item_id, scene, "view", mine[0].ts - 1000)
    with open(log, "ab") as f:
        f.write(encode(late) + b"\n")
    return late


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    log, ckpt, out = d / "log.jsonl", d / "ckpt", d / "out"
    run("generate", "--users", "600", "--seed", "3", "--out", str(log))
    append_one_late_event(log)
    run("train", "--input", str(log), "--cutoff", "0.8", "--epochs", "3", "--out", str(ckpt))
    proc = run("replay", "--input", str(log), "--checkpoint", str(ckpt), "--eval-cutoff", "0.8",
               "--out", str(out), "--json")
    return log, ckpt, out, proc


def test_replay_reports_prequential_recall_and_live_beats_stale_and_popular(loop):
    log, _, _, proc = loop
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = list(read_raw(log))
    bad = sum(1 for raw in lines if not hasattr(decode(raw, StreamConfig()), "event_id"))
    assert bad > 0, "generate must mix in malformed lines unless --clean"
    assert report["invalid"] == bad and report["events"] == len(lines) - bad
    assert report["late_dropped"] == 1 and report["events_per_s"] > 0
    p = report["prequential"]
    assert p["live"]["recall@10"] > p["stale"]["recall@10"]
    assert p["live"]["recall@10"] > p["popular"]["recall@10"]
    assert "trained on events at or after" not in proc.stderr  # train --cutoff == replay --eval-cutoff


def test_users_jsonl_has_one_record_per_user_with_the_published_schema(loop):
    log, ckpt, out, _ = loop
    records = [json.loads(line) for line in open(out / "users.jsonl")]
    events = load_events(input_path=log).events
    assert sorted(r["user_id"] for r in records) == sorted({e.user_id for e in events})
    config = json.loads((ckpt / "config.json").read_text())
    scenes, d = config["scenes"], config["model"]["d_model"]
    for r in records[:50]:
        assert set(r) == {"user_id", "model_version", "scenes", "fused", "global", "recent", "weights", "newest_ts",
                          "events"}
        assert r["model_version"] == config["version"]
        assert set(r["fused"]) == set(scenes) and len(r["global"]) == len(r["recent"]) == d
        assert set(r["scenes"]) <= set(scenes) and all(len(v) == d for v in r["scenes"].values())
        for target, w in r["weights"].items():
            assert set(w) == set(r["scenes"]) and abs(sum(w.values()) - 1) < 1e-5
        mine = [e for e in events if e.user_id == r["user_id"]]
        assert r["newest_ts"] == max(e.ts for e in mine)
        assert r["events"] == sum(min(WINDOW, sum(e.scene == s for e in mine)) for s in scenes)
        assert np.isfinite(r["global"]).all()


def test_replay_warns_when_the_model_saw_the_evaluated_events(loop, tmp_path):
    log, ckpt, _, _ = loop
    proc = run("replay", "--input", str(log), "--checkpoint", str(ckpt), "--eval-cutoff", "0.5", "--json")
    assert "trained on events at or after" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["warnings"]


def test_dataset_synthetic_is_what_generate_writes_by_default(tmp_path):
    log = tmp_path / "default.jsonl"
    run("generate", "--out", str(log))
    assert load_events(dataset="synthetic").events == load_events(input_path=log).events


def test_clear_errors_for_a_missing_checkpoint_and_a_missing_log(tmp_path, loop):
    log, ckpt, _, _ = loop
    proc = run("replay", "--input", str(log), "--checkpoint", str(tmp_path / "nope"), check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("replay", "--input", str(tmp_path / "nope.jsonl"), "--checkpoint", str(ckpt), check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("train", "--dataset", "synthetic", "--input", str(log), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "exactly one of" in proc.stderr


def test_every_subcommand_explains_itself():
    for cmd in ([], ["generate"], ["train"], ["replay"]):
        proc = run(*cmd, "--help")
        assert "Usage:" in proc.stdout and len(proc.stdout) > 200
