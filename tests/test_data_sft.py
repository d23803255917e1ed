"""SFT data: formats, loss masks (completions, assistant turns), EOS, truncation, packing, collation."""

import pytest
import torch

from alignlab.data.sft import (
    build_sft_examples,
    collate_sft,
    has_generation_tags,
    pack_sft_examples,
    parse_sft_row,
    render_with_assistant_mask,
    tokenize_sft,
)
from alignlab.errors import DataError

USER = {"role": "user", "content": "Hi"}
BOT = {"role": "assistant", "content": "Hello there!"}
CONVERSATION = [USER, BOT, {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Goodbye."}]

# ChatML with the assistant turns wrapped in {% generation %}, for transformers' assistant_masks.
TAGGED_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _targets(tok, ex) -> str:
    return tok.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m])


def test_format_detection_and_column_mapping():
    assert parse_sft_row({"messages": [USER, BOT]}, "f:1").kind == "messages"
    s = parse_sft_row({"prompt": "Q?", "completion": " A"}, "f:2")
    assert (s.kind, s.prompt, s.completion) == ("prompt_completion", "Q?", " A")
    s = parse_sft_row({"prompt": "Q?", "completion": [BOT]}, "f:3")
    assert s.prompt == [{"role": "user", "content": "Q?"}] and s.conversational
    assert parse_sft_row({"text": "hello"}, "f:4").kind == "text"
    s = parse_sft_row({"body": "hello", "q": "x"}, "f:5", dataset_text_field="body")
    assert (s.kind, s.text) == ("text", "hello")
    s = parse_sft_row({"q": "Q", "a": "A"}, "f:6", prompt_column="q", completion_column="a")
    assert (s.prompt, s.completion) == ("Q", "A")
    s = parse_sft_row({"conv": [USER, BOT]}, "f:7", messages_column="conv")
    assert s.messages == [USER, BOT]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q"}, "f.jsonl:3: missing field 'completion'"),
        ({"completion": "A"}, "f.jsonl:3: missing field 'prompt'"),
        ({"text": "   "}, "f.jsonl:3: field 'text' is empty"),
        ({"text": None}, "f.jsonl:3: field 'text' is null"),
        ({"messages": []}, "f.jsonl:3: field 'messages' is an empty message list"),
        ({"messages": "hi"}, "f.jsonl:3: field 'messages' must be a list"),
        ({"prompt": [USER], "completion": "A"}, "the prompt is a message list but the completion is plain text"),
        ({"input": "x"}, "f.jsonl:3: missing field: expected 'messages', 'prompt' and 'completion', or 'text'"),
    ],
)
def test_bad_rows_name_the_location(row, message):
    with pytest.raises(DataError) as info:
        parse_sft_row(row, "f.jsonl:3")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_text_gets_eos_and_trains_on_every_token_but_the_first(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = tokenize_sft(parse_sft_row({"text": "hello world"}, "f:1"), tok)
    assert ex["input_ids"] == tok("hello world").input_ids + [tok.eos_token_id]
    assert ex["loss_mask"] == [0] + [1] * (len(ex["input_ids"]) - 1)  # token 0 is never predicted
    # a text that already ends with EOS gets no second one
    ex = tokenize_sft(parse_sft_row({"text": "hello world" + tok.eos_token}, "f:1"), tok)
    assert ex["input_ids"].count(tok.eos_token_id) == 1


def test_prompt_completion_targets_the_completion_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = parse_sft_row({"prompt": "What is 2+2?", "completion": " 4."}, "f:1")
    ex = tokenize_sft(sample, tok)
    n_prompt = len(tok("What is 2+2?").input_ids)
    assert ex["loss_mask"] == [0] * n_prompt + [1] * (len(ex["input_ids"]) - n_prompt)
    assert _targets(tok, ex) == " 4." + tok.eos_token
    everything = tokenize_sft(sample, tok, completion_only_loss=False)
    assert everything["input_ids"] == ex["input_ids"] and sum(everything["loss_mask"]) == len(ex["input_ids"]) - 1


def test_conversational_prompt_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = tokenize_sft(parse_sft_row({"prompt": [USER], "completion": [BOT]}, "f:1"), tok)
    full = tok.apply_chat_template([USER, BOT], tokenize=True, return_dict=True)["input_ids"]
    assert ex["input_ids"] == list(full)  # no EOS added: the template closes the turn
    assert _targets(tok, ex) == "Hello there!<|im_end|>\n"


def test_messages_train_on_assistant_turns_only(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = parse_sft_row({"messages": CONVERSATION}, "f:1")
    ex = tokenize_sft(sample, tok)
    assert _targets(tok, ex) == "Hello there!<|im_end|>\nGoodbye.<|im_end|>\n"
    everything = tokenize_sft(sample, tok, assistant_only_loss=False)
    assert sum(everything["loss_mask"]) == len(everything["input_ids"]) - 1
    with pytest.raises(DataError, match=r"^f:2: no assistant message to train on"):
        tokenize_sft(parse_sft_row({"messages": [USER]}, "f:2"), tok)


def test_prefix_rendering_matches_generation_tags(tiny_tokenizer):
    """The two ways of finding assistant spans agree on a ChatML template (one with tags, one without)."""
    tok = tiny_tokenizer
    original = tok.chat_template
    try:
        tok.chat_template = TAGGED_CHATML
        assert has_generation_tags(tok)
        tagged = render_with_assistant_mask(tok, CONVERSATION)
        tok.chat_template = TAGGED_CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        assert not has_generation_tags(tok)
        prefixed = render_with_assistant_mask(tok, CONVERSATION)
    finally:
        tok.chat_template = original
    assert tagged == prefixed
    assert sum(tagged[1]) > 0


def test_truncation_and_dropping(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [("f:1", {"prompt": "one two three four", "completion": " five six seven"}), ("f:2", {"text": "a b c d e f g"})]
    n_prompt = len(tok("one two three four").input_ids)
    ex, stats = build_sft_examples(rows, tok, max_length=n_prompt + 2)
    assert stats.truncated == 2 and all(len(e["input_ids"]) == n_prompt + 2 for e in ex)
    assert ex[0]["loss_mask"] == [0] * n_prompt + [1, 1]
    ex, _ = build_sft_examples(rows, tok, max_length=3, truncation_mode="keep_end")
    assert ex[-1]["input_ids"][-1] == tok.eos_token_id and ex[-1]["loss_mask"][0] == 0
    # the prompt alone fills max_length: no target left, dropped and counted
    ex, stats = build_sft_examples(rows[:1], tok, max_length=n_prompt)
    assert ex == [] and stats.dropped_no_target == 1
    assert "1 dropped with no token to train on" in stats.describe()


def test_packing_keeps_every_example_with_restarting_positions():
    examples = [
        {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},
        {"input_ids": [4, 5], "loss_mask": [0, 1]},
        {"input_ids": [6, 7, 8, 9], "loss_mask": [0, 0, 1, 1]},
    ]
    packed = pack_sft_examples(examples, max_length=6)
    # first-fit decreasing: [6..9] + [4, 5] fill one row of 6; [1, 2, 3] goes to a second
    assert packed[0] == {"input_ids": [6, 7, 8, 9, 4, 5], "loss_mask": [0, 0, 1, 1, 0, 1], "position_ids": [0, 1, 2, 3, 0, 1]}
    assert packed[1] == {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "position_ids": [0, 1, 2]}
    batch = collate_sft(packed, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # padding: its own segment


def test_collate_unpacked():
    batch = collate_sft([{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4], "loss_mask": [0]}], pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert "position_ids" not in batch and batch["attention_mask"].dtype == torch.long
