"""Saving an ItemIndex to a folder and reading it back, refusing anything that is not what was saved.

A saved index is a folder: one faiss file per scope, arrays.safetensors (the live vectors and their slots), and
manifest.json (model version, spec, dim, item ids and scenes). Loading reads only those files, by bare names, each
within a size limit, checks every shape against the manifest, and refuses an index built for another model version.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file as save_arrays

from .item_index import GLOBAL, ItemIndex, _Scope, scene_codes
from .kinds import apply_search_knobs
from .spec import KINDS, IndexSpec

FORMAT = 2                      # 2: arrays in safetensors (1 held them in .npy files)
MANIFEST, ARRAYS = "manifest.json", "arrays.safetensors"
# Load limits: the manifest holds ~40 bytes per item (25M items fit); any other file, and the slot table in memory,
# 64 GiB; d up to 65,536. Files are named by bare names only: no path separators, no "..", no leading dot.
MAX_MANIFEST_BYTES, MAX_BYTES, MAX_DIM = 1 << 30, 64 << 30, 1 << 16
_BARE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_FAISS_MAGIC = re.compile(rb"I[A-Za-z0-9]{3}")   # faiss files open with a fourcc: IxMp, IwFl, IwPQ, ...


class IndexVersionError(ValueError):
    """A saved index belongs to another model version: its item vectors are not this model's."""


class IndexFormatError(ValueError):
    """A saved index folder that is not what save() writes: a bad manifest, a file too large, a shape off."""


def save_index(index: ItemIndex, path: str | Path, model_version: str) -> Path:
    """Write the index to folder `path`: one faiss file per scope, arrays.safetensors (live vectors and their
    slots), manifest.json (model version, spec, dim, item ids and scenes). Written into a new sibling folder that
    then replaces `path` by rename, so a reader finds the old index or the new one, never a mix; a folder that
    holds something other than a saved index is not replaced."""
    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not a saved index: not replaced")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    os.chmod(tmp, 0o755)   # as a plain mkdir would make it (mkdtemp's is private to the user)
    try:
        _write_files(index, tmp, model_version)
        if path.exists():   # two renames: between them a reader finds no index (and says so), never half of one
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

def _write_files(index: ItemIndex, path: Path, model_version: str) -> None:
    with index._write:  # no update meanwhile; searches only read, so they go on
        with index._lock:
            ids, scenes, vectors, _ = index._catalog()
            slots = np.flatnonzero(index._s.alive[:index._s.n]).astype(np.int64)
        scopes = []
        for j, (scene, scope) in enumerate(index._s.scopes.items()):
            entry = {"scene": scene, "kind": scope.kind, "live": scope.live, "dead": scope.dead}
            if index._aliased(scene):
                entry["file"] = None  # same index as the global scope
            else:
                entry["file"] = "global.faiss" if scene is GLOBAL else f"scene-{j}.faiss"
                faiss.write_index(scope.index, str(path / entry["file"]))
            scopes.append(entry)
        save_arrays({"vectors": np.ascontiguousarray(vectors), "slots": slots}, str(path / ARRAYS))
        manifest = {"format": FORMAT, "model_version": model_version, "spec": asdict(index.spec),
                    "dim": index.dim, "n_slots": index._s.n, "stale": index._s.stale,
                    "built_size": index._s.built_size, "scopes": scopes, "item_ids": ids, "item_scenes": scenes}
    (path / MANIFEST).write_text(json.dumps(manifest))

def load_index(path: str | Path, expected_model_version: Optional[str], device: Optional[str] = None) -> ItemIndex:
    """Read an index written by save_index(). Refuses one built for another model version (None: no check);
    `device` overrides the saved spec's (e.g. "cpu" for an index saved with "cuda"). Reads only the manifest
    (JSON), arrays.safetensors and the faiss files the manifest names (bare names in the folder), each within
    MAX_BYTES, and checks every shape against the manifest: anything else is an IndexFormatError."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"no saved index at {path} (make one with: scenestream index build "
                                f"--checkpoint CKPT --out {path})")

    def need(ok, what: str) -> None:
        if not ok:
            raise IndexFormatError(f"index at {path}: {what}; rebuild it with `scenestream index build`")

    def sized(name: str, limit: int) -> str:
        need(isinstance(name, str) and _BARE.fullmatch(name) and (path / name).is_file()
             and not (path / name).is_symlink(), f"file {str(name)[:80]!r} is not a bare file name in the folder")
        need((path / name).stat().st_size <= limit, f"{name} is over the {limit:,}-byte limit")
        return str(path / name)

    try:
        m = json.loads(Path(sized(MANIFEST, MAX_MANIFEST_BYTES)).read_bytes())
    except (ValueError, RecursionError) as exc:
        raise IndexFormatError(f"index at {path}: {MANIFEST} is not JSON: {exc}") from exc
    need(isinstance(m, dict) and m.get("format") == FORMAT,
         f"format {m.get('format') if isinstance(m, dict) else None}, this code reads {FORMAT}")
    if expected_model_version is not None and m.get("model_version") != expected_model_version:
        raise IndexVersionError(f"index at {path} was built for model {m.get('model_version')}, checkpoint is "
                                f"{expected_model_version}; rebuild with `scenestream index build "
                                f"--checkpoint CKPT --out {path}`")
    ids, scenes, dim, n_slots = m.get("item_ids"), m.get("item_scenes"), m.get("dim"), m.get("n_slots")
    need(isinstance(ids, list) and isinstance(scenes, list) and len(ids) == len(scenes)
         and all(isinstance(x, str) for x in ids + scenes) and len(set(ids)) == len(ids),
         "item_ids and item_scenes must be lists of strings of one length, ids unique")
    need(all(type(m.get(k)) is int and m[k] >= 0 for k in ("n_slots", "stale", "built_size")),
         "n_slots, stale and built_size must be integers >= 0")
    need(type(dim) is int and 0 < dim <= MAX_DIM, f"dim must be an integer in 1..{MAX_DIM}")
    need(len(ids) <= n_slots <= len(ids) + m["stale"] and n_slots * dim * 4 <= MAX_BYTES,
         "n_slots does not fit the items and stale count")
    try:
        spec = IndexSpec(**m["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"index at {path}: bad spec: {exc}") from exc
    idx = ItemIndex(dim, replace(spec, device=device) if device else spec)
    try:
        with safe_open(sized(ARRAYS, MAX_BYTES), "np") as f:
            keys, vectors, slots = set(f.keys()), f.get_tensor("vectors"), f.get_tensor("slots")
    except IndexFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise IndexFormatError(f"index at {path}: {ARRAYS} is not a safetensors file of vectors and slots: "
                               f"{exc}") from exc
    need(keys == {"vectors", "slots"}, f"{ARRAYS} must hold exactly vectors and slots")
    need(vectors.dtype == np.float32 and vectors.shape == (len(ids), dim) and np.isfinite(vectors).all(),
         f"vectors must be finite float32 [{len(ids)}, {dim}]")
    need(slots.dtype == np.int64 and slots.shape == (len(ids),) and len(np.unique(slots)) == len(ids)
         and (len(ids) == 0 or (slots.min() >= 0 and slots.max() < n_slots)),
         f"slots must be {len(ids)} distinct int64 in [0, n_slots)")
    names, code = scene_codes(scenes)
    idx._grow(n_slots)
    idx._s.item[slots] = ids
    idx._s.scene[slots] = [code[s] for s in scenes]
    idx._s.vec[slots] = vectors
    idx._s.alive[slots] = True
    idx._s.n, idx._s.scene_names, idx._s.scene_code = n_slots, names, code
    idx._s.where, idx._s.stale, idx._s.built_size = dict(zip(ids, slots.tolist())), m["stale"], m["built_size"]
    idx._s.cat, idx._s.means = None, {}
    scopes: dict[Optional[str], _Scope] = {}
    entries = m.get("scopes")
    need(isinstance(entries, list) and entries and isinstance(entries[0], dict)
         and entries[0].get("scene") is GLOBAL and entries[0].get("file") is not None,
         "scopes must be a list starting with the global scope's file")
    for e in entries:
        need(isinstance(e, dict) and (e.get("scene") is GLOBAL or isinstance(e.get("scene"), str)
                                      and e["scene"] in code) and e.get("scene") not in scopes
             and e.get("kind") in KINDS and e["kind"] != "auto"
             and all(type(e.get(k)) is int and e[k] >= 0 for k in ("live", "dead")),
             f"bad scope entry {str(e)[:200]}")
        if e.get("file") is None:
            scopes[e.get("scene")] = scopes[GLOBAL]
            continue
        file = sized(e["file"], MAX_BYTES)
        with open(file, "rb") as fh:
            need(_FAISS_MAGIC.fullmatch(fh.read(4)), f"{e['file']} is not a faiss index file")
        try:
            index = faiss.read_index(file)
        except RuntimeError as exc:
            raise IndexFormatError(f"index at {path}: {e['file']} does not read as a faiss index: {exc}") from exc
        need(index.d == dim and index.ntotal == e["live"] + e["dead"],
             f"{e['file']} holds {index.ntotal} vectors of d={index.d}, the manifest says "
             f"{e['live'] + e['dead']} of d={dim}")
        index = apply_search_knobs(index, e["kind"], idx.spec)
        scopes[e.get("scene")] = _Scope(e["kind"], index, e["live"], e["dead"])
    need(set(scopes) == {GLOBAL, *names}, "scopes must cover all items and each scene once")
    idx._s.scopes = scopes
    return idx
