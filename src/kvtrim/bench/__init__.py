"""The offline benchmark: configuration, the run's plan, evaluation of every cell, results and reports.

>>> config = BenchConfig(tasks=["niah_single_1"], methods=["knorm"], ratios=[0, 0.5], length=2048)
>>> run_bench(model, tokenizer, config, "results/quick").rows
"""
