"""One place for each rule, and the defects a read of the code found where a rule lived in two places or a hook for
tests lived in production code. Each test here failed on the code before the change that fixed it."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scenestream.stream.live.catalog import CatalogUpdate, decode_update
from scenestream.stream.core.config import StreamConfig
from scenestream.stream.core.events import Event, decode, encode

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("stream", "model", "index") for p in (ROOT / folder).rglob("*.py"))
CFG = StreamConfig()
TS = 1_767_225_600_000


def source_matches(pattern: str) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(pattern, line)]


# ---- ids: one rule for events, catalog items and API paths ------------------------------------------------------

@pytest.mark.parametrize("item", ["i" * n for n in (1, 127, 128, 129, 200, 256, 257)] +
                         ["é" * 128, "😀" * 100, "a\u0378b", "tab\there", "x\ue000"])
def test_an_item_the_catalog_indexes_is_an_item_clicks_can_name(item):
    """Before: events allowed 128 characters and the catalog 256, so an item with a 129-256 character id was
    indexed and every click on it rejected."""
    click = decode(encode(Event("e", "u", item, "video", "click", TS)), CFG)
    update = decode_update(json.dumps({"item_id": item, "scene": "video"}).encode(), CFG, 4)
    assert isinstance(click, Event) == isinstance(update, CatalogUpdate), (len(item), click, update)


@pytest.mark.parametrize("user", ["u" * 128, "u" * 129, "a\u0378b", "x\ue000", "ok"])
def test_the_api_looks_up_exactly_the_user_ids_events_accept(user):
    """Any other id is answered as an unknown user, never looked up (no state can hold it)."""
    from scenestream.stream.live.web import valid_user
    event = decode(encode(Event("e", user, "i", "video", "click", TS)), CFG)
    assert valid_user(user, CFG) == isinstance(event, Event)


# ---- popularity: one ranking rule ---------------------------------------------------------------------------------

def test_mostpop_breaks_ties_by_item_id_as_replay_and_the_api_do():
    """Before: the evaluation's MostPop broke equal counts by first appearance, replay and the API by item id."""
    from scenestream.stream.core.popularity import Popularity
    from scenestream.stream.offline.leave_one_out import LooCase, most_popular_loo
    ev = lambda n, u, i: Event(f"e{n}", u, i, "video", "click", TS + n)  # noqa: E731
    # "b" is seen before "a"; both once. u3 never saw either and holds out "a": by id it ranks first.
    cases = [LooCase("u1", [ev(0, "u1", "b")], ev(1, "u1", "z")), LooCase("u2", [ev(2, "u2", "a")], ev(3, "u2", "z")),
             LooCase("u3", [ev(4, "u3", "c"), ev(5, "u3", "c")], ev(6, "u3", "a"))]
    assert most_popular_loo(cases[2:], ks=(1,))["recall@1"] == 0.0          # only "c" has counts there
    assert most_popular_loo(cases, ks=(1,))["recall@1"] == pytest.approx(1 / 3)   # u3's "a" ranks first
    pop = Popularity()
    pop.add(e for c in cases for e in c.history)
    assert [i for i, _ in pop.ranked("video")] == ["c", "a", "b"]


# ---- the reserved item rows, the source check, the cache layout --------------------------------------------------

def test_the_reserved_item_rows_are_written_once():
    """PAD and OOV take rows 0 and 1; the offset of the first item was written as a literal 2 in five places."""
    assert source_matches(r"\[2:\]|len\(vocab\) [-+] 2|i \+ 2 for|\[\"\"\] \* 2|item_ids\) \+ 2") == []
    assert len(source_matches(r"^FIRST_ITEM = ")) == 1


def test_the_one_source_rule_is_written_once():
    assert len(source_matches(r"exactly one of --dataset or --input")) == 1


def test_every_cache_lives_under_one_root(tmp_path, monkeypatch):
    """Before: with SCENESTREAM_CACHE set, data sets went to $SCENESTREAM_CACHE/<name> but without it to
    ~/.cache/scenestream/datasets/<name>; the demo model went to <cache>/models either way."""
    from scenestream.stream.datasets import movielens
    from scenestream.stream.datasets.cache import cache_dir
    monkeypatch.setenv("SCENESTREAM_CACHE", str(tmp_path))
    monkeypatch.delenv("SCENESTREAM_ML100K_DIR", raising=False)
    folder = tmp_path / "datasets" / "ml-100k"
    folder.mkdir(parents=True)
    for name in ("ml-100k.inter", "ml-100k.item"):
        (folder / name).write_text("x\n")
    monkeypatch.setattr(movielens.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    assert movielens.ensure_files("ml-100k") == folder
    assert cache_dir("models", "m") == tmp_path / "models" / "m"
    monkeypatch.delenv("SCENESTREAM_CACHE")
    assert cache_dir("datasets") == Path.home() / ".cache" / "scenestream" / "datasets"


# ---- train: the configured actions and the documented window ------------------------------------------------------

def test_train_keeps_the_configured_actions_and_reads_the_documented_window(tmp_path):
    """Before: train decoded with SCENESTREAM_ACTIONS but saved the default actions (a custom action silently
    became action 0), and SCENESTREAM_WINDOW was documented but never read."""
    from scenestream.stream.datasets.synthetic import SyntheticSpec, generate
    events, _ = generate(SyntheticSpec(users=120, seed=4))
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(encode(Event(e.event_id, e.user_id, e.item_id, e.scene,
                                          "share" if e.action == "click" else "view", e.ts)) + b"\n" for e in events))
    env = {**os.environ, "SCENESTREAM_ACTIONS": "view,share", "SCENESTREAM_WINDOW": "20"}
    proc = subprocess.run([sys.executable, "-m", "scenestream.stream.cli", "train", "--input", str(log), "--epochs",
                           "1", "--out", str(tmp_path / "ckpt")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["actions"] == ["view", "share"] and config["window"] == 20
    assert config["meta"]["train_events"] > 0


# ---- hooks for tests, and resources -------------------------------------------------------------------------------

def test_no_fault_hooks_in_production_code():
    """Faults are injected from the tests (tests/faults.py), not switched on by variables the product reads."""
    assert source_matches(r"\bFAULT|SCENESTREAM_FAULT|\"highwater\"|\bstrategy\b") == []


def _defs_and_imports(tree: ast.Module) -> tuple[set[str], list[tuple[str, int]]]:
    imported = {a.asname or a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    defined = [(n.name, n.lineno) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return imported, defined


def test_no_attribute_bags_and_no_method_shadows_an_import():
    """Before: ItemIndex set its attributes through self.__dict__.update, and its method `tune` had the name of the
    function it imported and called."""
    assert source_matches(r"__dict__") == []
    shadows = []
    for path in SOURCES:
        imported, defined = _defs_and_imports(ast.parse(path.read_text()))
        shadows += [f"{path.relative_to(ROOT)}:{line} {name}" for name, line in defined if name in imported]
    assert not shadows, shadows


def test_child_process_logs_are_closed_by_the_parent(tmp_path):
    """Before: broker.py and run.py opened the child's log file and left it to the garbage collector (an
    "unclosed file" ResourceWarning each time)."""
    import gc
    import warnings

    from scenestream.stream.local.broker import EmbeddedBroker
    from scenestream.stream.local.processes import spawn, stop_process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with EmbeddedBroker(log_path=str(tmp_path / "tansu.log")):
            gc.collect()
        proc = spawn([sys.executable, "-c", "print('hello')"], tmp_path / "child.log")
        proc.wait(10)
        stop_process(proc)
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert (tmp_path / "child.log").read_text().strip() == "hello"


def test_an_unreadable_csv_is_counted_as_bad_csv_not_bad_json(tmp_path):
    from scenestream.stream.offline.logs import load_events
    log = tmp_path / "log.csv"
    log.write_bytes(b"event_id,user_id,item_id,scene,action,ts\ne1,u1,i1,video,click,1767225600000\n"
                    b'e2,u2,"' + b"i" * 200_000 + b'",video,click,1767225600001\n')  # over csv's field limit
    loaded = load_events(input_path=log)
    assert [e.event_id for e in loaded.events] == ["e1"] and dict(loaded.invalid) == {"bad_csv": 1}


def test_no_dead_code():
    """vulture over the product alone, so that code only the tests use shows up; what it cannot see used (Faust
    decorators, torch's forward, the API the benchmarks use, ...) is listed in tests/vulture_whitelist.py."""
    vulture = Path(sys.executable).with_name("vulture")
    targets = ["stream", "model", "index", "tests/vulture_whitelist.py"]
    proc = subprocess.run([str(vulture), *targets, "--min-confidence", "60"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_dead_code_check_sees_dead_code(tmp_path):
    (tmp_path / "m.py").write_text("def used():\n    return 1\n\n\ndef never_called():\n    return used()\n\n\nused()\n")
    vulture = Path(sys.executable).with_name("vulture")
    proc = subprocess.run([str(vulture), str(tmp_path), "--min-confidence", "60"], capture_output=True, text=True)
    assert proc.returncode != 0 and "never_called" in proc.stdout
