"""Offline probes and benchmarks: tasks generated locally, in the evaluated model's tokenizer."""
