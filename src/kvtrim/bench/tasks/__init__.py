"""Benchmark tasks, generated offline in the evaluated model's tokenizer (RULER's 13, passkey,
needle grids, perplexity) or read from published data (RULER, LongBench)."""
