"""MovieLens adapters: parsing of RecBole atomic files (offline) and the real ML-100k download (network)."""
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scenestream.stream.core.config import StreamConfig
from scenestream.stream.core.events import Event, validate_record
from scenestream.stream.offline.logs import DATASETS
from scenestream.stream.datasets.movielens import (FALLBACK_SCENE, GENRE_TO_SCENE, dataset_scenes, ensure_files, k_core,
                                          load_movielens)

ALL_GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
              "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]

# ML-1M style: CRLF lines, "genre" column; item 40 has an unknown genre, item 50 an empty one, item 60 no row.
INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
         "u1\t10\t5\t900000000\r\n"
         "u2\t20\t3\t900000005\r\n"
         "u1\t30\t4\t900000005\r\n"
         "u3\t40\t2\t900000001\r\n"
         "u3\t50\t1\t900000002\r\n"
         "u2\t60\t4.5\t900000003\r\n")
ITEM = ("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\r\n"
        "20\tHeat\t1995\tAction Crime Thriller\r\n"
        "30\tCasablanca\t1942\tDrama Romance War\r\n"
        "40\tOdd\t2000\tunknown\r\n"
        "50\tBlank\t2000\t\r\n")


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    monkeypatch.delenv("SCENESTREAM_ML1M_DIR", raising=False)
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ml-1m.inter").write_bytes(INTER.encode())
    (folder / "ml-1m.item").write_bytes(ITEM.encode())
    return tmp_path


def test_mapping_covers_every_movielens_genre():
    assert set(GENRE_TO_SCENE) == set(ALL_GENRES)
    assert set(GENRE_TO_SCENE.values()) | {FALLBACK_SCENE} == set(dataset_scenes("genre"))
    assert dataset_scenes("single") == ("movie",)
    with pytest.raises(ValueError):
        dataset_scenes("tv")


def test_parses_synthetic_atomic_files(synthetic):
    assert ensure_files("ml-1m", synthetic) == synthetic / "ml-1m"  # present: no download
    events = load_movielens("ml-1m", cache_dir=synthetic)
    assert [e.item_id for e in events] == ["10", "20", "30", "40", "50", "60"]  # file order
    assert [e.user_id for e in events] == ["u1", "u2", "u1", "u3", "u3", "u2"]
    assert [e.scene for e in events] == ["family", "action", "drama", FALLBACK_SCENE, FALLBACK_SCENE, FALLBACK_SCENE]
    assert [e.action for e in events] == ["like", "view", "like", "view", "view", "like"]
    assert events[0].ts == 900_000_000_000 and events[0].event_id == "ml-1m-000000001"
    # the two ratings at 900000005 keep file order (item 20 before item 30) under the stream's order key
    ordered = sorted(events, key=lambda e: e.order_key)
    assert [e.item_id for e in ordered] == ["10", "40", "50", "60", "20", "30"]
    config = StreamConfig(scenes=dataset_scenes("genre"))
    assert all(validate_record(e.to_json(), config) == e for e in events)

    single = load_movielens("ml-1m", scenes="single", cache_dir=synthetic)
    assert {e.scene for e in single} == {"movie"}
    assert [e.event_id for e in single] == [e.event_id for e in events]


def test_env_dir_and_bad_names(synthetic, monkeypatch):
    monkeypatch.setenv("SCENESTREAM_ML1M_DIR", str(synthetic / "ml-1m"))
    assert len(load_movielens("ml-1m")) == 6
    monkeypatch.setenv("SCENESTREAM_ML1M_DIR", str(synthetic))  # no files there: a clear error, no download
    with pytest.raises(RuntimeError, match="SCENESTREAM_ML1M_DIR"):
        ensure_files("ml-1m")
    with pytest.raises(ValueError):
        load_movielens("ml-20m", cache_dir=synthetic)


def test_real_ml100k_download(tmp_path, monkeypatch):
    """Downloads the recbole wheel from PyPI into an empty cache; fails (never skips) when that is impossible."""
    monkeypatch.delenv("SCENESTREAM_ML100K_DIR", raising=False)
    events = load_movielens("ml-100k", cache_dir=tmp_path)
    assert (tmp_path / "ml-100k" / "ml-100k.inter").is_file()
    assert len(events) == 100_000
    assert len({e.user_id for e in events}) == 943
    assert len({e.item_id for e in events}) == 1682
    scenes = Counter(e.scene for e in events)
    assert set(scenes) == set(dataset_scenes("genre"))
    assert Counter(e.action for e in events) == {"like": 55_375, "view": 44_625}  # ratings 4-5 vs 1-3
    assert events[0].to_json() == {"event_id": "ml-100k-000000001", "user_id": "196", "item_id": "242",
                                   "scene": "comedy", "action": "view", "ts": 881_250_949_000}
    assert len({e.event_id for e in events}) == len(events)


def test_the_data_set_source_gives_events_in_time_order(synthetic, monkeypatch):
    """A MovieLens file is sorted by user; replay and produce must stream it in the order the ratings happened."""
    from scenestream.stream.offline.logs import load_events
    monkeypatch.setenv("SCENESTREAM_ML1M_DIR", str(synthetic / "ml-1m"))
    loaded = load_events("ml-1m")
    assert [e.item_id for e in loaded.events] == ["10", "40", "50", "60", "20", "30"]


def _ratings(pairs):
    return [Event(f"r{n}", f"u{u}", f"i{i}", "movie", "view", 1_000 + n) for n, (u, i) in enumerate(pairs)]


def _peel_one_at_a_time(events, k):
    """An independent k-core: remove one user or item below k at a time (users first), until none is left."""
    events = list(events)
    while True:
        users, items = Counter(e.user_id for e in events), Counter(e.item_id for e in events)
        low_user = next((u for u, n in users.items() if n < k), None)
        low_item = next((i for i, n in items.items() if n < k), None)
        if low_user is None and low_item is None:
            return events
        events = [e for e in events if e.user_id != low_user] if low_user is not None else \
            [e for e in events if e.item_id != low_item]


def test_k_core_cascades_until_stable():
    """i3 has one rating: dropping it leaves u2 with one, dropping u2 leaves i2 with one: all three go; the rest
    (u0, u1 x i0, i1) is a 2-core and stays, in order."""
    events = _ratings([(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2)])
    kept = k_core(events, 2)
    assert [(e.user_id, e.item_id) for e in kept] == [("u0", "i0"), ("u0", "i1"), ("u1", "i0"), ("u1", "i1")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), unique=True, max_size=50), st.integers(1, 4))
def test_k_core_is_the_unique_k_core(pairs, k):
    events = _ratings(pairs)
    kept = k_core(events, k)
    assert kept == _peel_one_at_a_time(events, k)
    assert all(n >= k for n in Counter(e.user_id for e in kept).values())
    assert all(n >= k for n in Counter(e.item_id for e in kept).values())
    assert k_core(kept, k) == kept


def test_ml_1m_5core_is_a_data_set(synthetic):
    assert "ml-1m-5core" in DATASETS
    assert load_movielens("ml-1m-5core", cache_dir=synthetic) == k_core(load_movielens("ml-1m", cache_dir=synthetic), 5)
    assert load_movielens("ml-1m-5core", cache_dir=synthetic) == []   # the six ratings there are no 5-core
