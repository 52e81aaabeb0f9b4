"""Split a prompt into the context part (compressed) and the question part (never compressed).

With a chat template the context and the question share one user message, so the template is
rendered once around a placeholder and cut there: the context prefix holds the template's opening
and the context, the question suffix holds the question and the template's closing (assistant
prefix). Models without a chat template get a plain "Question: … Answer:" layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtrim.core.errors import KVTrimError
from kvtrim.models.adapters import max_context

_PLACEHOLDER = "\x00KVTRIM_QUESTION\x00"


@dataclass(frozen=True)
class PromptLayout:
    """How text around the context and each question is rendered for one tokenizer."""

    context_text: str
    question_suffix: str  # appended after the question text
    question_prefix: str = ""
    add_special_tokens: bool = False  # for the context part only

    def question_text(self, question: str) -> str:
        return f"{self.question_prefix}{question}{self.question_suffix}"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def layout_for(tokenizer: Any, context: str, use_chat_template: bool | None = None) -> PromptLayout:
    """Build the layout; ``use_chat_template=None`` uses the template when the tokenizer has one."""
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    if use_chat_template:
        messages = [{"role": "user", "content": f"{context}\n\n{_PLACEHOLDER}"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix, suffix = rendered.split(_PLACEHOLDER)
        return PromptLayout(context_text=prefix, question_suffix=suffix)
    return PromptLayout(
        context_text=f"{context}\n\n",
        question_prefix="Question: ",
        question_suffix="\nAnswer:",
        add_special_tokens=True,
    )


def encode(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def question_tokens(tokenizer: Any, layout: PromptLayout, question: str | None) -> int:
    """How many tokens :func:`encode_context` appends for ``question`` (0 without one)."""
    return 0 if question is None else len(encode(tokenizer, layout.question_prefix + question))


def encode_context(
    model: Any,
    tokenizer: Any,
    context: str | PromptLayout,
    use_chat_template: bool | None,
    question: str | None = None,
) -> tuple[PromptLayout, list[int]]:
    """Lay out and tokenize the part of the prompt to compress: the context, then (query-aware) the
    question with its prefix but not the template's closing. Refuses an empty context or question,
    and a prompt beyond the model's window. A ready :class:`PromptLayout` is used as it is (a
    server renders a conversation's own text around its document).

    The question is tokenized apart from the context, at the same boundary as when it is asked
    after a compressed context, so both layouts hold the same tokens."""
    text = context.context_text if isinstance(context, PromptLayout) else context
    if not text or not text.strip():
        raise KVTrimError("The context is empty: give some text to compress.")
    if isinstance(context, PromptLayout):
        layout = context
    else:
        layout = layout_for(tokenizer, context, use_chat_template)
    ids = encode(tokenizer, layout.context_text, layout.add_special_tokens)
    what = "context"
    if question is not None:
        if not question.strip():
            raise KVTrimError("The question is empty.")
        ids += encode(tokenizer, layout.question_prefix + question)
        what = "context with its question"
    limit = max_context(model)
    if len(ids) >= limit:
        raise KVTrimError(
            f"The {what} is {len(ids)} tokens long, longer than the model's window of {limit} tokens; "
            "shorten it or use a model with a longer context."
        )
    return layout, ids
