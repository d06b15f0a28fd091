"""kfp pipelines: wiring only. ``runner`` compiles, runs locally, submits and schedules them."""
