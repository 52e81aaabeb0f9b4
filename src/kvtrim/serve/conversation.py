"""Where a request's prompt is cut: the leading document (compressed, stored, reused) and the rest.

The whole conversation is rendered once with the model's chat template; the cut is found by
rendering it again with a marker at the cut point, so the two parts together are exactly the
template's text. The cut falls

- at the end of the messages before the last user message (a system message holding the document,
  or a first user message holding it, then the question), or
- when the conversation is one user message, after its last blank line: ``"document\\n\\nquestion"``
  is split as :func:`kvtrim.compress` splits a context from its question, so the server and a
  :class:`~kvtrim.Session` see the same tokens;

and a completion's prompt is cut after its last blank line too. Models without a chat template get
the plain layout of :mod:`kvtrim.models.prompting` (``Question: … Answer:``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvtrim.core.errors import KVTrimError
from kvtrim.models.prompting import PromptLayout, has_chat_template, layout_for

_MARK = "\x00KVTRIM_CUT\x00"
_QUESTION = "\x00KVTRIM_QUESTION\x00"
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """A prompt cut in two: ``context`` (None when there is nothing before the cut) and ``rest``."""

    context: PromptLayout | None
    rest: str

    @property
    def text(self) -> str:
        return (self.context.context_text if self.context else "") + self.rest


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> Prompt:
    """The prompt of a chat request (``messages`` already checked: roles, string contents)."""
    if not messages:
        raise KVTrimError("messages is empty: give at least one user message.")
    if messages[-1]["role"] != "user":
        raise KVTrimError("The last message must be the user's: there is nothing to answer otherwise.")
    whole = _render(tokenizer, messages)
    if len(messages) == 1:
        content = messages[0]["content"]
        cut = content.rfind("\n\n")
        if cut < 0 or not content[:cut].strip():
            return Prompt(None, whole)
        layout = layout_for(tokenizer, content[:cut])
        rest = layout.question_text(content[cut + 2 :])
    else:
        index = max(i for i, m in enumerate(messages) if m["role"] == "user") - 1
        if index < 0:
            return Prompt(None, whole)
        layout = leading_layout(tokenizer, messages[: index + 1])
        rest = whole[len(layout.context_text) :]
    if layout.context_text + rest != whole:
        return Prompt(None, whole)  # a template that rewrites content: no cut
    return Prompt(layout, rest)


def leading_layout(tokenizer: Any, leading: Sequence[dict[str, str]]) -> PromptLayout:
    """The layout of a conversation's leading messages as a context: its text, and the text around
    one user message that follows it (what a request naming the stored context asks)."""
    if not has_chat_template(tokenizer):
        parts = _plain_parts([*leading, {"role": "user", "content": ""}])
        return PromptLayout(
            context_text="".join(parts[:-1]),
            question_prefix="Question: ",
            question_suffix="\nAnswer:",
            add_special_tokens=True,
        )
    marked = [dict(m) for m in leading]
    marked[-1]["content"] += _MARK
    rendered = _render(tokenizer, [*marked, {"role": "user", "content": _QUESTION}])
    if rendered.count(_MARK) != 1 or rendered.count(_QUESTION) != 1:
        raise KVTrimError("This model's chat template rewrites message contents: kvtrim cannot cut it.")
    head, tail = rendered.split(_MARK)
    prefix, suffix = tail.split(_QUESTION)
    return PromptLayout(context_text=head, question_prefix=prefix, question_suffix=suffix)


def completion_prompt(tokenizer: Any, prompt: str) -> Prompt:
    """A completion's prompt, cut after its last blank line (nothing is added around it)."""
    if not prompt:
        raise KVTrimError("prompt is empty.")
    cut = prompt.rfind("\n\n")
    if cut < 0:
        return Prompt(None, prompt)
    return Prompt(
        PromptLayout(context_text=prompt[: cut + 2], question_suffix="", add_special_tokens=True),
        prompt[cut + 2 :],
    )


def _render(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "".join(_plain_parts(messages))


def _plain_parts(messages: Sequence[dict[str, str]]) -> list[str]:
    parts = []
    for i, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "assistant":
            parts.append(f"Answer: {content}\n\n")
        elif i == len(messages) - 1:  # its last paragraph is the question, as in the plain layout
            cut = content.rfind("\n\n") + 2 if "\n\n" in content else 0
            parts.append(f"{content[:cut]}Question: {content[cut:]}\nAnswer:")
        else:
            parts.append(f"{content}\n\n")
    return parts
