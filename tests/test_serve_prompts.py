"""How the server cuts a prompt into its document and the rest, and how it streams text."""

from __future__ import annotations

import pytest
from conftest import make_tokenizer

from kvtrim.core.errors import KVTrimError
from kvtrim.models.prompting import layout_for
from kvtrim.serve.conversation import chat_prompt, completion_prompt, leading_layout
from kvtrim.serve.decoding import TextStream


@pytest.mark.parametrize("template", [True, False])
def test_one_message_is_cut_as_compress_cuts_a_context(template):
    tok = make_tokenizer(chat_template=template)
    prompt = chat_prompt(tok, [{"role": "user", "content": "the document\n\nmore of it\n\nthe question?"}])
    layout = layout_for(tok, "the document\n\nmore of it")
    assert prompt.context == layout
    assert prompt.rest == layout.question_text("the question?")


@pytest.mark.parametrize("template", [True, False])
def test_everything_before_the_last_user_message_is_the_context(template):
    tok = make_tokenizer(chat_template=template)
    messages = [
        {"role": "system", "content": "the document"},
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second?"},
    ]
    prompt = chat_prompt(tok, messages)
    assert prompt.context is not None and prompt.context.context_text.endswith(
        "one" if template else "one\n\n"
    )
    assert "second?" in prompt.rest and "first?" not in prompt.rest
    follow_up = leading_layout(tok, messages[:3])
    assert follow_up.context_text == prompt.context.context_text
    assert follow_up.question_text("second?") == prompt.rest


def test_nothing_to_cut_and_bad_conversations():
    tok = make_tokenizer()
    assert chat_prompt(tok, [{"role": "user", "content": "just a question"}]).context is None
    with pytest.raises(KVTrimError, match="last message"):
        chat_prompt(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    prompt = completion_prompt(tok, "doc\n\ncontinue")
    assert prompt.context.context_text == "doc\n\n" and prompt.rest == "continue"
    assert completion_prompt(tok, "no blank line").context is None


class _Characters:
    """A tokenizer whose tokens are code points (decoding joins them with no separator)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_string():
    stream = TextStream(_Characters(), stops=["END"])
    pieces = [stream.push(ord(c)) for c in "abEN"]
    assert "".join(pieces) == "ab"  # "EN" may start "END"
    assert stream.push(ord("x")) == "ENx"
    assert [stream.push(ord(c)) for c in "yEND"] == ["y", "", "", ""]
    assert stream.stopped and stream.text == "abENxy" and stream.finish() == ""


def test_text_stream_never_emits_half_a_character():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    first, second = "é".encode()
    assert stream.push(first) == "" and stream.push(second) == "é"
