"""FAISS item index: per-scene and global inner-product search under live catalog updates, saved with its model
version. A leaf package: it imports nothing else of SceneStream.

`ItemIndex` and `IndexVersionError` load faiss when first used, so `IndexSpec` (spec.py) can be read without it.
"""
if not __name__.startswith("scenestream."):
    raise ImportError(f"import this package as scenestream.{__name__} (it is installed under that name only)")

from .spec import IndexSpec  # noqa: E402


def __getattr__(name: str):
    if name in ("ItemIndex", "IndexVersionError"):
        from . import item_index
        return getattr(item_index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IndexSpec", "IndexVersionError", "ItemIndex"]
