"""Loading and saving: SOURCE specs, architectures without weights, compressed checkpoints, input data."""
