from .flat import ItemIndex

__all__ = ["ItemIndex"]
