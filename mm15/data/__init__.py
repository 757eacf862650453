"""Data: the sample schema, readers, mixtures, packing and the synthetic data engine."""
