"""Training: the stage loop, its data stream, and complete, atomic checkpoints."""
