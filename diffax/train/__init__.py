"""Training: config schema, train state, the pure train step, Orbax checkpoints and the loop."""
