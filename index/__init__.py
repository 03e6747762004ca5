from .item_index import IndexVersionError, ItemIndex
from .spec import IndexSpec

__all__ = ["IndexSpec", "IndexVersionError", "ItemIndex"]
