"""Evaluation metrics for MM1.5 benchmarks, re-implemented from the reference evaluators' rules."""
