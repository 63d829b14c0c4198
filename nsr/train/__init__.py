"""The training lab: config, data, engine loop, checkpoints, output folder."""
