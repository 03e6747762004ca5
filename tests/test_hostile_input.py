"""Hostile input: catalog records, checkpoints and saved indexes that are malformed, oversized or carry a
pickle are refused with a reason and change nothing; `ItemIndex.save` replaces a folder in one rename."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from scenestream.index import ItemIndex, load_index, save_index
from scenestream.index import persist as persist_module
from scenestream.index.persist import IndexFormatError
from scenestream.model import checkpoint as checkpoint_module
from scenestream.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scenestream.model.config import ModelConfig
from scenestream.model.model import InterestModel
from scenestream.model.vocab import ItemVocab
from scenestream.stream.live.catalog import (CATALOG_REASONS, CatalogFollower, CatalogUpdate, apply_updates,
                                        decode_update, max_record_bytes)
from scenestream.stream.core.config import StreamConfig
from scenestream.stream.core.events import Rejection

CFG = StreamConfig(scenes=("video", "article", "shop"))
D = 4


def rec(**kw) -> bytes:
    return json.dumps(kw).encode()


def raw(text: str) -> bytes:
    return text.encode()


# ---- catalog records --------------------------------------------------------------------------------------------

HOSTILE = [
    (raw('{"item_id": "a", "scene": "shop", "vector": [1, 2, 3, NaN]}'), "non_finite"),
    (raw('{"item_id": "a", "scene": "shop", "vector": [1, 2, 3, -Infinity]}'), "non_finite"),
    (raw('{"item_id": "a", "scene": "shop", "vector": [1, 2, 3, 1e999]}'), "non_finite"),   # parses as inf
    (rec(item_id="a", scene="shop", vector=[1, 2, 3, 1e39]), "non_finite"),                # beyond float32
    (raw('{"item_id": "a", "scene": "shop", "vector": [1, 2, 3, ' + "9" * 400 + "]}"), "non_finite"),
    (rec(item_id="a", scene="shop", vector=[1, 2, 3]), "wrong_dim"),
    (rec(item_id="a", scene="shop", vector=[]), "wrong_dim"),
    (rec(item_id="a", scene="shop", vector=[0.5] * 100_000), "oversized"),                  # huge vector
    (rec(item_id="a", scene="shop", pad="x" * 10_000), "oversized"),
    (rec(item_id="a", scene="podcast"), "unknown_scene"),
    (rec(item_id="a", scene="Shop"), "unknown_scene"),
    (b"{", "bad_json"), (b"", "bad_json"), (b"\xff\xfe", "not_utf8"), (b"[" * 2000 + b"]" * 2000, "bad_json"),
    (b"[1]", "not_object"), (b"null", "not_object"), (None, "not_object"),
    (rec(item_id=7, scene="shop"), "wrong_type"), (rec(item_id="a", scene=["shop"]), "wrong_type"),
    (rec(item_id="a", scene="shop", vector="1,2,3,4"), "wrong_type"),
    (rec(item_id="a", scene="shop", vector=[1, 2, 3, "4"]), "wrong_type"),
    (rec(item_id="a", scene="shop", vector=[1, 2, 3, True]), "wrong_type"),
    (rec(item_id="a", scene="shop", vector=[1, 2, 3, [4]]), "wrong_type"),
    (rec(item_id="a", scene="shop", vector={"0": 1}), "wrong_type"),
    (rec(scene="shop"), "missing_field"), (rec(item_id="a"), "missing_field"),
    (rec(item_id="", scene="shop"), "empty_field"), (rec(item_id="a" * 129, scene="shop"), "too_long"),
    (rec(item_id="a\u0000b", scene="shop"), "bad_chars"), (rec(item_id="a\ud800", scene="shop"), "bad_chars"),
    (rec(item_id="a", op="rename"), "unknown_op"), (rec(item_id="a", op=None, scene="shop"), "unknown_op"),
]


@pytest.mark.parametrize("payload,reason", HOSTILE, ids=[f"{n}-{r}" for n, (_, r) in enumerate(HOSTILE)])
def test_hostile_catalog_records_are_refused_with_their_reason(payload, reason):
    got = decode_update(payload, CFG, D)
    assert isinstance(got, Rejection), got
    assert (got.reason, bool(got.detail.strip())) == (reason, True), got
    assert reason in CATALOG_REASONS


def test_every_catalog_reason_but_a_bug_has_an_example():
    """Of a record's payload; a batch no client decodes is tests/test_real_producers.py's."""
    assert {r for _, r in HOSTILE} == set(CATALOG_REASONS) - {"decoder_error", "undecodable_batch"}


def test_the_size_bound_admits_any_real_record_of_d_numbers():
    for d in (4, 64, 1024):
        worst = rec(item_id="é" * 128, scene="article", vector=[-1.2345678901234567e-38] * d)
        assert len(worst) <= max_record_bytes(d)
        assert isinstance(decode_update(worst, CFG, d), CatalogUpdate)


def test_refused_records_never_reach_the_index_and_are_counted_by_reason(caplog):
    vecs = np.eye(D, dtype=np.float32)
    index = ItemIndex.build(["i0", "i1", "i2", "i3"], ["video", "shop", "shop", "article"], vecs)
    counted = []
    follower = CatalogFollower("unused:9092", "item-catalog", index, CFG, D, count=lambda o, n: counted.append((o, n)))
    try:
        decoded = [decode_update(p, CFG, D) for p, _ in HOSTILE]
        with caplog.at_level(logging.WARNING, logger="scenestream.stream.live.catalog"):
            for n, d in enumerate(decoded):
                follower._reject(f"item-catalog[0]@{n}", d.reason, d.detail)
        apply_updates(index, [d for d in decoded if isinstance(d, CatalogUpdate)])
    finally:
        follower.stop()
    assert index.item_ids == ["i0", "i1", "i2", "i3"] and np.array_equal(index.vectors, vecs)
    assert follower.counts["rejected"] == len(HOSTILE) and counted == [("rejected", 1)] * len(HOSTILE)
    assert follower.refused["non_finite"] == 5 and sum(follower.refused.values()) == len(HOSTILE)
    assert "item-catalog[0]@0 refused: non_finite: " in caplog.text


# ---- checkpoints ------------------------------------------------------------------------------------------------

SCENES, ACTIONS = ("video", "article", "shop"), ("view", "click", "like", "buy")


@pytest.fixture
def ckpt(tmp_path) -> Path:
    vocab = ItemVocab(["a", "b", "c"], ["video", "shop", "video"])
    torch.manual_seed(0)
    model = InterestModel(ModelConfig(n_items=len(vocab), n_scenes=3, n_actions=4, d_model=8, n_layers=1))
    save_checkpoint(tmp_path / "ckpt", model, vocab, SCENES, ACTIONS, 20)
    return tmp_path / "ckpt"


class _Boom:
    """Unpickling this writes a marker file: proof that a refused checkpoint was never unpickled."""
    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_a_valid_checkpoint_loads(ckpt):
    assert load_checkpoint(ckpt).vocab.item_ids == ["a", "b", "c"]


@pytest.mark.parametrize("make,message", [
    (lambda p, state: torch.save(state, p), "is a zip archive \\(torch.save\\)"),
    (lambda p, state: torch.save(state, p, _use_new_zipfile_serialization=False), "is a pickle"),
    (lambda p, state: p.write_bytes(pickle.dumps(_Boom(), protocol=4)), "is a pickle"),
    (lambda p, state: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json"), "is not a safetensors file"),
    (lambda p, state: p.write_bytes(b"\xff" * 8 + b"{}"), "is not a safetensors file"),
    (lambda p, state: p.write_bytes(b""), "is not a safetensors file"),
])
def test_a_pickle_or_other_file_in_place_of_the_weights_is_refused_unread(ckpt, make, message):
    _Boom.marker = str(ckpt / "MARKER")
    state = load_checkpoint(ckpt).model.state_dict()
    make(ckpt / "model.safetensors", state)
    with pytest.raises(CheckpointError, match=message + ".*only safetensors weights are loaded"):
        load_checkpoint(ckpt)
    assert not (ckpt / "MARKER").exists()


def test_a_pt_file_next_to_a_missing_weights_file_is_named_and_not_read(ckpt):
    _Boom.marker = str(ckpt / "MARKER")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.pt").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="missing model.safetensors; model.pt is not read: pickle-bearing"):
        load_checkpoint(ckpt)
    assert not (ckpt / "MARKER").exists()


def test_weights_of_other_shapes_are_refused_before_any_allocation(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["d_model"] = 16
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match the configured model.*shape"):
        load_checkpoint(ckpt)
    config["model"]["d_model"], config["model"]["n_items"] = 10**9, 10**9    # would need terabytes: refused first
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its vocabulary"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["config.json", "items.json", "model.safetensors"])
def test_checkpoint_files_over_their_size_limit_are_refused(ckpt, monkeypatch, name):
    monkeypatch.setitem(checkpoint_module.MAX_BYTES, name, (ckpt / name).stat().st_size - 1)
    with pytest.raises(CheckpointError, match=f"{name} is .* bytes, over the limit"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("items", ['[["a"], [1]]', '{"a": 1}', "[[]]", "[", '"x"'])
def test_malformed_checkpoint_json_is_a_checkpoint_error(ckpt, items):
    (ckpt / "items.json").write_text(items)
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)


# ---- saved indexes ------------------------------------------------------------------------------------------------

def small_index() -> ItemIndex:
    rng = np.random.default_rng(3)
    ids = [f"i{n}" for n in range(60)]
    return ItemIndex.build(ids, [("video", "shop", "article")[n % 3] for n in range(60)],
                           rng.normal(size=(60, 8)).astype(np.float32))


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_index(small_index(), tmp_path / "ix", "v1")


def edit_manifest(path: Path, change) -> None:
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_a_saved_index_round_trips(saved):
    assert len(load_index(saved, "v1")) == 60
    assert sorted(p.name for p in saved.iterdir()) == ["arrays.safetensors", "global.faiss", "manifest.json",
                                                       "scene-1.faiss", "scene-2.faiss", "scene-3.faiss"]


@pytest.mark.parametrize("name", ["../ix/global.faiss", "/etc/hostname", "sub/global.faiss", "..", ".", "",
                                  ".hidden", "a\\b", "global.faiss\x00", "link.faiss", 7, ["global.faiss"]])
def test_the_manifest_names_bare_file_names_only(saved, name):
    (saved / "link.faiss").symlink_to(saved / "global.faiss")
    edit_manifest(saved, lambda m: m["scopes"][0].update(file=name))
    with pytest.raises(IndexFormatError, match="is not a bare file name in the folder"):
        load_index(saved, "v1")


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(format=1), "format 1, this code reads 2"),
    (lambda m: m.update(dim=16), "vectors must be finite float32"),
    (lambda m: m.update(dim=10**9), "dim must be an integer"),
    (lambda m: m.update(n_slots=10**12), "n_slots does not fit"),
    (lambda m: m.update(stale=-1), "must be integers >= 0"),
    (lambda m: m.update(item_ids=m["item_ids"][:-1]), "of one length"),
    (lambda m: m.update(item_ids=[1] * 60), "lists of strings"),
    (lambda m: m.update(spec={"kind": "evil"}), "bad spec"),
    (lambda m: m.update(spec=[]), "bad spec"),
    (lambda m: m["scopes"][1].update(kind="auto"), "bad scope entry"),
    (lambda m: m["scopes"][1].update(scene=["video"]), "bad scope entry"),
    (lambda m: m["scopes"][1].update(scene=None), "bad scope entry"),
    (lambda m: m["scopes"][1].update(live=5), "holds 20 vectors of d=8, the manifest says 5"),
    (lambda m: m.update(scopes=m["scopes"][:-1]), "each scene once"),
    (lambda m: m.update(scopes=m["scopes"][1:]), "starting with the global scope"),
])
def test_a_tampered_manifest_is_refused_with_what_is_wrong(saved, change, message):
    edit_manifest(saved, change)
    with pytest.raises(IndexFormatError, match=message):
        load_index(saved, "v1")


@pytest.mark.parametrize("name,content,message", [
    ("arrays.safetensors", pickle.dumps({"vectors": 1}), "not a safetensors file"),
    ("global.faiss", pickle.dumps(1), "is not a faiss index file"),
    ("global.faiss", b"IxMp" + b"\x00" * 12, "does not read as a faiss index"),
    ("manifest.json", b"\x80\x04K\x01.", "is not JSON"),
])
def test_index_files_of_the_wrong_kind_are_refused(saved, name, content, message):
    (saved / name).write_bytes(content)
    with pytest.raises(IndexFormatError, match=message):
        load_index(saved, "v1")


def test_arrays_of_the_wrong_dtype_or_slots_out_of_range_are_refused(saved):
    from safetensors.numpy import load_file, save_file
    arrays = load_file(saved / "arrays.safetensors")
    save_file({**arrays, "slots": arrays["slots"] + 1000}, saved / "arrays.safetensors")
    with pytest.raises(IndexFormatError, match="slots must be 60 distinct int64"):
        load_index(saved, "v1")
    save_file({**arrays, "vectors": arrays["vectors"].astype(np.float64)}, saved / "arrays.safetensors")
    with pytest.raises(IndexFormatError, match="vectors must be finite float32"):
        load_index(saved, "v1")


def test_index_files_over_the_size_limit_are_refused(saved, monkeypatch):
    monkeypatch.setattr(persist_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(IndexFormatError, match="manifest.json is over the 100-byte limit"):
        load_index(saved, "v1")
    monkeypatch.setattr(persist_module, "MAX_MANIFEST_BYTES", 1 << 30)
    monkeypatch.setattr(persist_module, "MAX_BYTES", 2000)
    with pytest.raises(IndexFormatError, match="arrays.safetensors is over the 2,000-byte limit"):
        load_index(saved, "v1")


def test_save_replaces_the_folder_in_one_rename_and_leaves_nothing_behind(tmp_path, monkeypatch):
    wide = small_index()
    save_index(wide, tmp_path / "ix", "v1")
    one_scene = ItemIndex.build(["x", "y"], ["video", "video"], np.ones((2, 8), np.float32))
    save_index(one_scene, tmp_path / "ix", "v2")          # fewer files: the old scene files must not survive
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["arrays.safetensors", "global.faiss",
                                                                   "manifest.json"]
    assert load_index(tmp_path / "ix", "v2").item_ids == ["x", "y"]
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]        # no temporary folder left

    def fail(*a):
        raise OSError("disk full")
    monkeypatch.setattr(persist_module.faiss, "write_index", fail)
    with pytest.raises(OSError, match="disk full"):
        save_index(wide, tmp_path / "ix", "v3")
    assert load_index(tmp_path / "ix", "v2").item_ids == ["x", "y"]   # the old index is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]


def test_save_never_replaces_a_folder_that_is_not_an_index(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a saved index"):
        save_index(small_index(), tmp_path / "data", "v1")
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert len(load_index(save_index(small_index(), tmp_path / "empty", "v1"), "v1")) == 60
