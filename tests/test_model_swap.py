"""Model swap without a restart (stream/live/swap.py): a real worker on the embedded broker serves checkpoint A from a
folder; a deploy points the folder at checkpoint B mid-stream; the worker swaps encoder and index at once, keeps
every window, and serves B. An incompatible checkpoint is refused while B keeps serving."""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from scenestream.model.checkpoint import load_checkpoint, save_checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.model.config import preset
from scenestream.model.config import TrainConfig
from scenestream.stream.core.config import DEFAULT_ACTIONS
from scenestream.stream.core.events import Event, encode
from scenestream.stream.offline.leave_one_out import fit
from scenestream.stream.live.produce import produce_lines

from .conftest import SMALL, WorkerProcess, run
from .test_api import get, metric_values, recs, wait_ready
from .test_worker import assert_equal_records, offline_records, read_topic, stream_of, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def checkpoint_b(tmp_path_factory, small_world):
    """Another small model of the same scenes, actions and window: trained with another seed."""
    events, _ = small_world
    ckpt, _ = fit(events, SMALL.scenes, DEFAULT_ACTIONS, 50, cfg=TrainConfig(epochs=1, val_users=200, seed=7),
                  model_cfg={"scene_layers": preset(None)["scene_layers"]}, progress=False)
    out = tmp_path_factory.mktemp("ckpt-b")
    save_checkpoint(out, ckpt.model, ckpt.vocab, ckpt.scenes, ckpt.actions, 50, {"cutoff_ts": None})
    return out


def version_of(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["version"]


def deploy(link: Path, target: Path) -> None:
    """Point the served folder at another checkpoint in one step (a symlink replaced by rename)."""
    tmp = link.with_name(link.name + ".next")
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def wait_until(what: str, ok, w, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = ok()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{what} within {timeout:g} s\n{w.log_text()}")


def metrics(w) -> dict[str, float]:
    return metric_values(get(w.api + "/metrics")[1].decode())


def test_a_model_swap_mid_stream_loses_nothing_and_serves_the_new_model_exactly(broker, checkpoint, checkpoint_b,
                                                                               tmp_path):
    version_a, version_b = version_of(checkpoint), version_of(checkpoint_b)
    assert version_a != version_b
    link = tmp_path / "current"
    link.symlink_to(checkpoint, target_is_directory=True)
    w = WorkerProcess(broker, link, tmp_path, extra=("--model-poll", "0.5")).start()
    try:
        events, lines, bad = stream_of(4000, 40, seed=21)
        half = len(lines) // 2
        first_lines = set(lines[:half])
        first = [e for e in events if encode(e) in first_lines]
        second = [e for e in events if encode(e) not in first_lines]
        # users of the second half whose history began in the first: their windows span the swap
        spanning = {e.user_id for e in second} & {e.user_id for e in first}
        untouched = sorted({e.user_id for e in first} - {e.user_id for e in second})
        assert len(spanning) >= 20 and untouched

        wait_ready(w)
        # the live catalog amends the model's items: two deleted, one added (cold start); B's index must hold that too
        item_ids, item_scenes, vectors = InterestEncoder(load_checkpoint(checkpoint_b), "cpu", cache_mb=0).item_vectors()
        gone = [i for i, s in zip(item_ids, item_scenes) if s == "video"][:2]
        records = [{"item_id": i, "op": "delete"} for i in gone] + [{"item_id": "brand-new", "scene": "video"}]
        run(produce_lines(broker.bootstrap, w.topics["catalog"], [json.dumps(r).encode() for r in records],
                          progress=False, key_field="item_id"))
        wait_until("the catalog was not applied", lambda: get(w.api + "/readyz")[1]["items"] == len(item_ids) - 1, w)
        run(produce_lines(broker.bootstrap, w.topics["clicks"], lines[:half], progress=False))
        wait_for(broker, w.topics["out"], offline_records(checkpoint, first))
        assert get(w.api + "/readyz")[1]["model_version"] == version_a

        t0 = time.monotonic()
        deploy(link, checkpoint_b)
        wait_until("the worker did not swap to B",
                   lambda: get(w.api + "/readyz")[1]["model_version"] == version_b, w)
        print(f"swap seen by the API {time.monotonic() - t0:.1f} s after the deploy")

        run(produce_lines(broker.bootstrap, w.topics["clicks"], lines[half:], progress=False))
        want_b = offline_records(checkpoint_b, events)   # model B over ALL of each user's events
        touched = {e.user_id for e in second}
        got = wait_for(broker, w.topics["out"], {u: want_b[u] for u in touched})
        # (2) every user touched after the swap: B's records, equal to B's offline replay over both halves
        assert {got[u]["model_version"] for u in touched} == {version_b}
        assert_equal_records({u: got[u] for u in touched}, {u: want_b[u] for u in touched})
        # untouched users keep A's published record
        assert {got[u]["model_version"] for u in untouched} == {version_a}

        # (1) nothing lost: every valid event applied once, every bad one a dead letter
        m = metrics(w)
        assert m["scenestream_events_consumed_total"] == len(events)
        assert len(run(read_topic(broker.bootstrap, w.topics["dlq"], idle=1.0))) == len(bad)
        assert m["scenestream_model_swaps_total{outcome=swapped}"] == 1
        assert m[f"scenestream_model_info{{version={version_b}}}"] == 1

        # (3) the API answers in B: records, recommendations (ranked against B's items as the catalog amends them)
        assert get(w.api + "/readyz")[1]["items"] == len(item_ids) - 1
        keep = [n for n, i in enumerate(item_ids) if i not in gone]
        video = [n for n in keep if item_scenes[n] == "video"]
        ids = [item_ids[n] for n in keep] + ["brand-new"]
        table = np.vstack([vectors[keep], vectors[video].mean(axis=0, keepdims=True)])
        for user in sorted(spanning)[:10] + untouched[:5]:   # untouched: recomputed under B on request
            status, rec = get(f"{w.api}/users/{urllib.parse.quote(user)}/interests")
            assert status == 200 and rec["model_version"] == version_b
            assert_equal_records({user: rec}, {user: want_b[user]})
            status, body = recs(w, user, k=10, exclude_seen="false")
            assert status == 200 and body["model_version"] == version_b and body["fallback"] is None
            scores = table @ np.asarray(want_b[user]["global"], dtype=np.float32)
            assert {i["item_id"] for i in body["items"]} == {ids[n] for n in np.argsort(-scores)[:10]}
            status, body = recs(w, user, scene="video", k=1000, exclude_seen="false")
            listed = {i["item_id"] for i in body["items"]}
            assert "brand-new" in listed and not listed & set(gone)

        # (4) an incompatible checkpoint (other scenes) is refused; B keeps serving and publishing
        bad_ckpt = tmp_path / "other-scenes"
        shutil.copytree(checkpoint, bad_ckpt)
        config = json.loads((bad_ckpt / "config.json").read_text())
        config["scenes"] = ["video", "article", "radio"]
        (bad_ckpt / "config.json").write_text(json.dumps(config))
        deploy(link, bad_ckpt)
        wait_until("the incompatible checkpoint was not refused",
                   lambda: metrics(w).get("scenestream_model_swaps_total{outcome=refused}") == 1, w)
        assert "model swap refused" in w.log_text() and "scenes" in w.log_text()
        assert get(w.api + "/readyz")[1]["model_version"] == version_b
        user = sorted(spanning)[0]
        late = Event("after-refusal", user, first[0].item_id, first[0].scene, "click",
                     max(e.ts for e in events) + 1000)
        run(produce_lines(broker.bootstrap, w.topics["clicks"], [encode(late)], progress=False))
        want = offline_records(checkpoint_b, [e for e in events if e.user_id == user] + [late])
        got = wait_for(broker, w.topics["out"], want)
        assert got[user]["model_version"] == version_b
        assert_equal_records({user: got[user]}, want)
        time.sleep(1.5)   # several more polls: refused once, not at every look
        assert metrics(w)["scenestream_model_swaps_total{outcome=refused}"] == 1
        assert w.proc.poll() is None
    finally:
        w.kill()
