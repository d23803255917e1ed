"""Prompt rows for the online algorithms: the three formats, truncation, columns, errors."""

import pytest

from alignlab.data.prompts import build_prompt_examples, parse_prompt
from alignlab.errors import DataError


def test_text_prompt_is_tokenized_as_is(tiny_tokenizer):
    rows = [("p.jsonl:1", {"prompt": "Count to three:", "answer": 3})]
    (ex,), stats = build_prompt_examples(rows, tiny_tokenizer)
    assert ex["prompt_ids"] == tiny_tokenizer("Count to three:").input_ids
    assert ex["columns"] == {"answer": 3} and ex["location"] == "p.jsonl:1"
    assert stats.kept == 1 and stats.from_pairs == 0


def test_conversational_prompt_gets_the_chat_template_and_an_open_assistant_turn(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    (ex,), _ = build_prompt_examples([("p:1", {"prompt": messages})], tiny_tokenizer)
    expected = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ex["prompt_ids"] == list(expected["input_ids"])
    assert tiny_tokenizer.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_prompt_is_extracted_from_an_implicit_prompt_pair(tiny_tokenizer):
    row = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    assert parse_prompt(row, "x:1") == "\n\nHuman: Hi?\n\nAssistant:"
    _, stats = build_prompt_examples([("x:1", row)], tiny_tokenizer)
    assert stats.from_pairs == 1


def test_long_prompts_keep_their_last_tokens(tiny_tokenizer):
    text = " ".join(f"word{i}" for i in range(40))
    ids = tiny_tokenizer(text).input_ids
    (ex,), stats = build_prompt_examples([("p:1", {"prompt": text})], tiny_tokenizer, max_prompt_length=5)
    assert ex["prompt_ids"] == ids[-5:] and stats.truncated == 1


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "hi"}, "p:3: no 'prompt' field and no chosen/rejected pair"),
        ({"prompt": ""}, "p:3: field 'prompt' is empty"),
        ({"prompt": 5}, "p:3: field 'prompt' must be a string or a list"),
    ],
)
def test_bad_rows_name_their_location(tiny_tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        build_prompt_examples([("p:3", row)], tiny_tokenizer)
