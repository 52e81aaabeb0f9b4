"""Split a prompt into the context part (compressed) and the question part (never compressed).

With a chat template the context and the question share one user message, so the template is
rendered once around a placeholder and cut there: the context prefix holds the template's opening
and the context, the question suffix holds the question and the template's closing (assistant
prefix). Models without a chat template get a plain "Question: … Answer:" layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
