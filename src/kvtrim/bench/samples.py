"""Every task's samples for a run, deterministic from its configuration's seed."""

from __future__ import annotations

from typing import Any

from kvtrim.bench.config import EXTRA_TASKS, BenchConfig
from kvtrim.bench.tasks import loaders
from kvtrim.bench.tasks.perplexity import perplexity_samples
from kvtrim.bench.tasks.registry import generate, needle_grid
from kvtrim.bench.tasks.sample import Sample
from kvtrim.models.prompting import encode, has_chat_template, layout_for


def uses_chat_template(tokenizer: Any, config: BenchConfig, task: str) -> bool:
    """Perplexity reads raw text, so it never gets a chat template."""
    if task == "perplexity":
        return False
    return has_chat_template(tokenizer) if config.chat_template is None else config.chat_template


def template_tokens(tokenizer: Any, chat_template: bool) -> int:
    """Tokens the prompt layout adds around context and question (RULER counts them in the length)."""
    layout = layout_for(tokenizer, "", chat_template)
    return len(encode(tokenizer, layout.context_text, layout.add_special_tokens)) + len(
        encode(tokenizer, layout.question_text(""))
    )


def build_samples(config: BenchConfig, tokenizer: Any) -> dict[str, list[Sample]]:
    """Every task's samples, deterministic from the configuration's seed."""
    chat = uses_chat_template(tokenizer, config, "")
    extra = template_tokens(tokenizer, chat)
    out = _published_samples(config, tokenizer, extra)
    for task in config.tasks:
        if task == "perplexity":
            out[task] = perplexity_samples(
                tokenizer,
                config.length,
                config.samples,
                config.seed,
                config.ppl_text,
                config.ppl_tokens,
                extra_tokens=template_tokens(tokenizer, False),
            )
        elif task == "needle_grid":
            out[task] = needle_grid(
                tokenizer,
                config.grid_lengths or [config.length],
                config.grid_depths,
                config.seed,
                n_per_cell=config.grid_samples,
                extra_tokens=extra,
            )
        elif config.dataset == "generated":
            out[task] = generate(
                task,
                tokenizer,
                config.length,
                config.samples,
                config.seed,
                config.haystack_file,
                data_file=config.data_files.get(task),
                extra_tokens=extra,
            )
    return out


def _published_samples(config: BenchConfig, tokenizer: Any, extra: int) -> dict[str, list[Sample]]:
    """The samples of ``--dataset ruler`` / ``longbench`` tasks, read from local data."""
    data_tasks = [t for t in config.tasks if t not in EXTRA_TASKS]
    if config.dataset == "ruler" and data_tasks:
        return loaders.load_ruler(
            config.data or loaders.RULER_HUB_ID, data_tasks, config.samples, config.length
        )
    if config.dataset == "longbench" and data_tasks:
        loaded = loaders.load_longbench(config.data or loaders.LONGBENCH_HUB_ID, data_tasks, config.samples)
        return {
            task: [loaders.truncate_middle(tokenizer, s, config.length, extra) for s in items]
            for task, items in loaded.items()
        }
    return {}
