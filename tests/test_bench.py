"""Every script in bench/ runs at a tiny size, so that each figure on the results page keeps a command that runs.

One smoke test per script: `python bench/NAME.py ...` from the repository root, at the smallest size that still
takes the script's real code path, must exit 0 and print what it claims (figures present and plausible). Scripts
that serve a model get the session's small checkpoint; outputs and temp files go to tmp_path, never to
BENCHMARKS.md or soak.png."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

from scenestream.stream.core.config import CODECS

from .conftest import ROOT


def bench(name: str, *args, tmp_path, timeout: float = 180) -> str:
    """Run bench/NAME.py with args (temp files under tmp_path); its stdout, once it exited 0 having printed some.
    One OpenMP thread (torch, faiss): these runs check what a script prints, not its speed, and spinning threads
    on a busy 2-core machine can make a run ten times slower."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, f"bench/{name}.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"bench/{name}.py exited {done.returncode}:\n{done.stderr[-4000:]}"
    assert done.stdout.strip(), f"bench/{name}.py printed nothing:\n{done.stderr[-4000:]}"
    return done.stdout


def _module(name: str):
    """bench/NAME.py imported as a module (bench/ on sys.path, as when it runs)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


def test_every_script_and_every_figures_script_has_a_smoke_test():
    """Each script of bench/ (not the modules the others import, nor results_page.py, checked by test_layout.py) has
    a test here, and each script a command of bench/results.json runs exists."""
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"harness", "tiny_checkpoint", "results_page",
                                                                 "fresh_ramp"}   # live.py's ramp phase
    cited = {name for f in json.loads((ROOT / "bench" / "results.json").read_text())["figures"]
             for name in re.findall(r"python bench/(\w+)\.py", f["command"])}
    assert cited and cited <= scripts
    assert scripts <= {name.removeprefix("test_") for name in globals() if name.startswith("test_")}


def test_broker_batches(tmp_path):
    r = last_json(bench("broker_batches", "--steps", "150,200", "--waits", "10,50", "--give-up", "10", "--json",
                        tmp_path=tmp_path))
    assert [row["batches"] for row in r["one_record_batches"]] == [150, 200]
    for row in r["one_record_batches"]:
        assert row["last_100_records_wait_10"] == row["last_100_records_wait_50"] == 100
        assert row["from_0_records"] >= 100 and row["last_100_ms_wait_50"] > 0
    assert r["batches_of_100"]["batches"] == 2 and r["batches_of_100"]["last_100_records"] == 100


def test_broker_batches_steady(tmp_path):
    r = last_json(bench("broker_batches", "--steps", "", "--steady", "0,30", "--steady-seconds", "1.5", "--rate", "400",
                        "--json", tmp_path=tmp_path))
    assert "one_record_batches" not in r and [row["batches_per_partition"] for row in r["steady"]] == [0, 30]
    for row in r["steady"]:   # every record sent during the step is received once, none from the fill
        assert row["received"] == row["sent"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] < 5000


def test_chaos(tmp_path, checkpoint):
    r = last_json(bench("chaos", "--events", 300, "--rate", 100, "--kills", 1, "--freeze", 1, "--checkpoint",
                        checkpoint, "--workdir", tmp_path / "work", "--settle-timeout", 120, "--json",
                        tmp_path=tmp_path, timeout=300))
    assert r["produced"] == {"sent": 300} and r["kills"] == 1 and r["malformed_injected"] == 30
    assert r["users_compared"] == r["users"] > 0 and r["users_differing"] == 0 and r["max_abs_diff"] <= 1e-5
    assert r["dlq_matches_injected"] and r["broker_outage_survived"]


def test_compression(tmp_path, checkpoint):
    r = json.loads(bench("compression", "--checkpoint", checkpoint, "--events", 1000, "--batch", 250,
                         "--repeat", 1, "--json", tmp_path=tmp_path))
    assert set(r["results"]) == {"output (json)", "output (binary)", "changelog"}
    for rows in r["results"].values():
        assert [row["codec"] for row in rows] == list(CODECS)
        none = rows[0]
        assert none["records"] > 0 and none["bytes_per_record"] > none["payload_bytes_per_record"] > 0
        assert all(row["ratio"] > none["ratio"] and row["build_us_per_record"] > 0 for row in rows[1:])


def test_core_path(tmp_path, checkpoint):
    r = last_json(bench("core_path", "--checkpoint", checkpoint, "--events", 4000, "--batch", 500,
                        "--fresh-batches", 2, "--fresh-users", 50, "--json", tmp_path=tmp_path))["this"]
    assert 0 < r["backlog"]["events"] < 4000 and r["fresh"]["events"] == 100   # the 2 cold batches left out
    for m in r.values():
        stages = [m[f"{s}_us"] for s in ("decode", "join", "encode", "output", "changelog")]
        assert m["cpu_us_per_event"] > 0 and math.isclose(sum(stages), m["cpu_us_per_event"], rel_tol=1e-6)


def test_encoder(tmp_path):
    r = last_json(bench("encoder", "--batches", 2, "--windows", 10, "--repeats", 2, "--json", tmp_path=tmp_path))
    [row] = r["rows"]
    assert (row["window"], row["batch"]) == (10, 2) and row["exact_1e-5"]
    assert row["full_us_per_event"] > 0 and row["incremental_us_per_event"] > 0 and row["cache_bytes_per_window"] > 0


def test_fuzz(tmp_path):
    r = json.loads(bench("fuzz", "--events", 300, "--catalog", 100, "--dim", 8, tmp_path=tmp_path))
    for part, n in (("events", 300), ("catalog", 100)):
        got = r[part]
        assert got["payloads"] == n == sum(got["outcomes"].values()) and got["outcomes"].get("accepted", 0) > 0
        assert got["exceptions"] == got["decoder_errors"] == got["valid_refused"] == 0


def test_index(tmp_path):
    # 10,000 items: the least at which ivf-pq is really built (smaller scopes fall back to exact search)
    r = last_json(bench("index", "--items", 10_000, "--dim", 16, "--queries", 100, "--batch1-queries", 20, "--json",
                        tmp_path=tmp_path))
    assert list(r["kinds"]) == ["exact", "ivf-flat", "ivf-pq", "hnsw"]
    for kind, k in r["kinds"].items():
        assert k["scope_kinds"] == [kind] and 0 < k["recall@10"] <= 1 and k["qps_batch1"] > 0 and k["qps_batch256"] > 0
    assert r["kinds"]["exact"]["recall@10"] == 1.0 and r["wrapper_overhead"] > 0


def test_live(tmp_path, checkpoint):
    r = last_json(bench("live", "--events", 20_000, "--checkpoint", checkpoint, "--raw-repeat", 1, "--poll", 0.02,
                        "--fresh-rate", 200, "--fresh-seconds", 3, "--settle", 0.5, "--drain-max", 30, "--json",
                        tmp_path=tmp_path, timeout=300))
    assert r["events"] == 20_000
    assert [x["decoder"] for x in r["raw"]] == ["orjson", "json"] and all(x["events_per_s"] > 0 for x in r["raw"])
    assert r["noop"][0]["variant"] == "baseline" and r["noop"][0]["events_per_s"] > 0
    assert "error" not in r["worker"] and r["worker"]["complete"] and r["worker"]["events_per_s"] > 0
    assert {"worker_over_noop", "worker_over_raw", "noop_over_raw"} <= set(r["ratios"])
    fresh = r["fresh"]
    assert fresh["sent"] > 0 and fresh["failed_sends"] == 0 and fresh["drain_seconds"] is not None
    assert fresh["records"] > 0 and fresh["latency_ms"]["p50"] > 0


def test_live_ramp(tmp_path, checkpoint):
    """The fresh-traffic ramp (bench/fresh_ramp.py) on both sides of --against, this checkout standing in for the
    other: every step drained, records measured by the consumer child, a knee or none on each side."""
    r = last_json(bench("live", "--phases", "ramp", "--checkpoint", checkpoint, "--ramp-users", 30, "--ramp-rates",
                        "100,200", "--ramp-seconds", 2, "--settle", 0.5, "--drain-max", 30, "--against", ROOT,
                        "--json", tmp_path=tmp_path, timeout=300))
    sides = r["ramp"]["sides"]
    assert [s["side"] for s in sides] == ["against", "this"]
    for side in sides:
        assert "error" not in side, side
        assert [st["rate"] for st in side["steps"]] == [100, 200] and side["broker"] == "per-step"
        for st in side["steps"]:
            assert st["drain_seconds"] is not None and st["records"] > 0 and 0 < st["p50_ms"] <= st["p99_ms"]
        assert side["knee"] in (None, 100, 200)


def test_quality(tmp_path):
    work = tmp_path / "quality"
    out = bench("quality", "--datasets", "ml-100k", "--seeds", 0, "--genre-seeds", 0, "--epochs", 1,
                "--genre-epochs", 1, "--no-prequential", "--workdir", work, "--no-write", tmp_path=tmp_path,
                timeout=300)
    assert "| MostPop |" in out and "| SceneStream, one scene | 1 |" in out and "headline figures" not in out
    r = json.loads((work / "results.json").read_text())["ml-100k"]
    assert 0 < r["mostpop"]["ndcg@10"] < 1
    for scenes in ("single", "genre"):
        [run] = r[scenes]
        assert run["train"]["epochs"] == 1 and run["global"]["users"] == 943 and 0 < run["global"]["ndcg@10"] < 1
    assert r["genre"][0]["sparse_fused"]["users"] > 0
    # what --write does with ML-1M's figures: into a copy of the results source and of both pages
    quality = _module("quality")
    for name in ("bench/results.json", "BENCHMARKS.md", "README.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    run = {"global": {"ndcg@10": 0.2, "recall@10": 0.3}, "sparse_fused": {"ndcg@10": 0.5},
           "sparse_scene_only": {"ndcg@10": 0.25}}
    assert quality.record({"ml-1m": {"single": [run], "genre": [run, run]}}, "python bench/quality.py X",
                          root=tmp_path) == 3
    figures = {f["key"]: f for f in json.loads((tmp_path / "bench/results.json").read_text())["figures"]}
    assert figures["quality-genre"]["value"] == "0.2000 ± 0.0000 / 0.3000 ± 0.0000"
    assert figures["quality-single"]["value"] == "0.2000 / 0.3000" and figures["transfer"]["value"].endswith("2.00x")
    assert "0.2000 ± 0.0000" in (tmp_path / "BENCHMARKS.md").read_text()
    assert "| **0.2000** |" in (tmp_path / "README.md").read_text()


def test_rocks_state(tmp_path, checkpoint):
    r = last_json(bench("rocks_state", "--users", 300, "--cap", 100, "--queries", 20, "--checkpoint", checkpoint,
                        "--timeout", 120, "--json", tmp_path=tmp_path, timeout=300))
    assert r["events"] == 900 and r["a_apply_seconds"] > 0 and r["a_rss"]["VmRSS"] > 0
    assert r["a_queries"]["with_vector"] == r["a_queries"]["asked"] == 20 and r["a_queries"]["status"] == {"200": 20}
    assert r["b_ready_seconds"] > 0 and r["c_ready_seconds"] > 0 and r["c_rss"]["VmRSS"] > 0


def test_soak(tmp_path, checkpoint):
    # the plot needs matplotlib (the bench extra); without it the rest of the run is still checked
    drawn = importlib.util.find_spec("matplotlib") is not None
    png = tmp_path / "soak.png"
    r = last_json(bench("soak", "--minutes", 0.1, "--max-rate", 200, "--interval", 2, "--warmup", 0.02,
                        "--users", 200, "--samples", tmp_path / "samples.json", "--checkpoint", checkpoint, "--json",
                        *(["--plot", png] if drawn else ["--no-plot"]), tmp_path=tmp_path, timeout=300))
    assert r["rate"] == 100 and r["exits"] == []
    # every user's windows seeded and recovered, and each user touched once, before the load
    assert r["history"]["users"] == 200 and r["history"]["recovered_seconds"] > 0 and r["history"]["touch_seconds"] > 0
    assert r["load"]["record_batches"] > 0
    # the workers' own histograms: the wait before a worker takes an event up is part of its latency
    lat = r["load"]["latency_ms_bucket_bound"]
    assert 0 < lat["p99_before_the_worker"] <= lat["p99"], lat
    estimate = r["load"]["latency_ms_interpolated"]   # within the bucket whose bound is the figure above
    assert 0 < estimate["p50"] <= estimate["p99"] <= lat["p99"], (estimate, lat)
    assert r["load"]["sent"] > 0 and r["load"]["failed_sends"] == 0 and r["load"]["drain_seconds"] is not None
    assert r["rss_growth_after_warmup_pct"] is not None and r["lag_at_end"] is not None and "| 1 |" in r["table"]
    assert len(json.loads((tmp_path / "samples.json").read_text())) >= 3
    assert r["plot"] == (str(png) if drawn else None)
    assert not drawn or png.read_bytes().startswith(b"\x89PNG")


def test_soak_reads_a_quantile_as_its_bucket_bound_or_within_the_bucket():
    soak = _module("soak")
    before = [{0.05: 10, 0.1: 10, 0.25: 10, math.inf: 10}]   # counts before the interval: taken off
    after = [{0.05: 10, 0.1: 60, 0.25: 110, math.inf: 110}]  # 50 in (50, 100] ms, 50 in (100, 250] ms
    assert soak.bucket_quantile(before, after, 0.75) == 250
    assert math.isclose(soak.bucket_quantile(before, after, 0.75, interpolate=True), 175)
    assert math.isclose(soak.bucket_quantile(before, after, 0.25, interpolate=True), 75)
    assert soak.bucket_quantile(before, before, 0.5) is None


def test_startup(tmp_path, checkpoint):
    r = last_json(bench("startup", "--runs", 1, "--checkpoint", checkpoint, "--no-faust-defaults", "--json",
                        tmp_path=tmp_path))
    assert set(r) == {"faust_scenestream_settings_s", "worker_start_to_first_record_s"}
    assert all(len(v) == 1 and math.isfinite(v[0]) and v[0] > 0 for v in r.values())


def test_state(tmp_path):
    r = last_json(bench("state", "--users", 200, "--sample-users", 20, "--events-per-window", 10, "--chunk", 50,
                        "--forms", "packed", "object", "--json", tmp_path=tmp_path))
    assert set(r["form"]) == {"packed", "object"}
    for form, f in r["form"].items():
        assert f["live"]["windows"] == f["recovered"]["windows"] == 60
        assert f["live"]["tracemalloc_bytes_per_window"] > 0 and f["recovered"]["tracemalloc_bytes_per_window"] > 0
        assert f["rss"]["users_built"] == 200 and f["rss"]["rss_bytes_per_window"] > 0
        assert (f["changelog_bytes_per_window"] is None) == (form == "object")


def test_train_step(tmp_path):
    out = bench("train_step", "--dataset", "ml-100k", "--users", 40, "--batches", 3, "--passes", 1, "--threads", 1,
                tmp_path=tmp_path)
    steps = {m[1]: float(m[2]) for m in re.finditer(r"^(genre|single) +full step +([\d.]+) ms", out, re.M)}
    assert set(steps) == {"genre", "single"} and all(v > 0 for v in steps.values())
    ratio = re.search(r"genre / one scene: ([\d.]+)x \((\d+) steps each", out)
    assert ratio and float(ratio[1]) > 0 and ratio[2] == "3"
    assert re.search(r"scene stack forward \+ backward [\d.]+ ms", out)


