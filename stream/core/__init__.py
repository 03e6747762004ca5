"""The pure layer: the event and its decoder, the window lattice, the micro-batch step, popularity. No Kafka, no
Faust, no HTTP, no torch: tested without a broker, and imported by every shell above it."""
