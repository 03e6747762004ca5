"""The interest model in PyTorch: scene encoder, cross-scene fusion, training, checkpoints, inference, ranking
metrics. A leaf package: it imports nothing else of SceneStream (events are any objects with item_id, scene, action
and ts)."""
if not __name__.startswith("scenestream."):
    raise ImportError(f"import this package as scenestream.{__name__} (it is installed under that name only)")
