"""The streaming side of SceneStream, bottom-up: the pure core (core/: event, decoder, window lattice, the
micro-batch step, popularity), the data (logs, data sets, the leave-one-out protocol, replay), the live shell
(changelog state, the micro-batch service, recommendations, the Faust worker and its HTTP views) and the CLI."""
if not __name__.startswith("scenestream."):
    raise ImportError(f"import this package as scenestream.{__name__} (it is installed under that name only)")
