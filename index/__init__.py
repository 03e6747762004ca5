"""FAISS item index: per-scene and global inner-product search under live catalog updates, saved with its model
version. A leaf package: it imports nothing else of SceneStream.

`ItemIndex`, `save_index`, `load_index` and `IndexVersionError` load faiss when first used, so `IndexSpec` (spec.py)
can be read without it.
"""
if not __name__.startswith("scenestream."):
    raise ImportError(f"import this package as scenestream.{__name__} (it is installed under that name only)")

from .spec import IndexSpec  # noqa: E402


def __getattr__(name: str):
    if name == "ItemIndex":
        from .item_index import ItemIndex
        return ItemIndex
    if name in ("IndexVersionError", "IndexFormatError", "save_index", "load_index"):
        from . import persist
        return getattr(persist, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IndexFormatError", "IndexSpec", "IndexVersionError", "ItemIndex", "load_index", "save_index"]
