"""Preference formats, tokenization, truncation and collation."""

import pytest
import torch

from alignlab.data.preference import (
    build_pair_examples,
    collate_pairs,
    common_prefix_length,
    parse_pair,
    split_implicit_prompt,
    tokenize_pair,
)
from alignlab.errors import DataError


def test_implicit_prompt_cuts_after_last_assistant_marker():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: I can help."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: I cannot."
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant:"
    assert (c, r) == (" I can help.", " I cannot.")


def test_implicit_prompt_without_marker_cuts_at_word_boundary():
    # the common prefix "Answer: I" ends inside a word; the cut goes back to the last space
    assert split_implicit_prompt("Answer: It is", "Answer: I am") == ("Answer:", " It is", " I am")
    assert split_implicit_prompt("The sky is blue", "The sky is green") == ("The sky is", " blue", " green")


def test_parse_explicit_implicit_and_conversational():
    p = parse_pair({"prompt": "Q?", "chosen": "A", "rejected": "B"}, "f:1")
    assert (p.prompt, p.chosen, p.rejected, p.conversational) == ("Q?", "A", "B", False)
    p = parse_pair({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}, "f:2")
    assert p.prompt == "\n\nHuman: Q\n\nAssistant:"
    user = {"role": "user", "content": "Q"}
    good, bad = {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}
    p = parse_pair({"chosen": [user, good], "rejected": [user, bad]}, "f:3")
    assert (p.prompt, p.chosen, p.rejected) == ([user], [good], [bad])
    p = parse_pair({"prompt": "Q", "chosen": [good], "rejected": [bad]}, "f:4")
    assert p.prompt == [user]


def test_column_mapping():
    p = parse_pair({"q": "Q?", "good": "A", "bad": "B"}, "f:1", prompt_column="q", chosen_column="good", rejected_column="bad")
    assert (p.prompt, p.chosen, p.rejected) == ("Q?", "A", "B")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q", "chosen": "A"}, "f.jsonl:7: missing field 'rejected'"),
        ({"prompt": "Q", "chosen": "  ", "rejected": "B"}, "f.jsonl:7: field 'chosen' is empty"),
        ({"prompt": "Q", "chosen": "A", "rejected": None}, "f.jsonl:7: field 'rejected' is null"),
        ({"prompt": "Q", "chosen": 3, "rejected": "B"}, "f.jsonl:7: field 'chosen' must be a string"),
        ({"chosen": "xyz", "rejected": "abc"}, "share no prompt prefix"),
    ],
)
def test_bad_rows_name_the_location(row, message):
    with pytest.raises(DataError) as info:
        parse_pair(row, "f.jsonl:7")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_tokenize_appends_eos_to_text_completions(tiny_tokenizer):
    tok = tiny_tokenizer
    pair = parse_pair({"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."}, "f:1")
    ids = tokenize_pair(pair, tok)
    assert ids["chosen_ids"][-1] == tok.eos_token_id
    assert ids["rejected_ids"][-1] == tok.eos_token_id
    assert ids["prompt_ids"] == tok("What is 2+2?").input_ids
    assert tok.decode(ids["chosen_ids"]) == " 4." + tok.eos_token


def test_tokenize_conversational_uses_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    user = {"role": "user", "content": "Hi"}
    pair = parse_pair(
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]},
        "f:1",
    )
    ids = tokenize_pair(pair, tok)
    assert ids["prompt_ids"] == list(tok.apply_chat_template([user], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert tok.decode(ids["chosen_ids"]).startswith("Hello!<|im_end|>")


def _rows(*pairs):
    return [(f"f.jsonl:{i + 1}", {"prompt": p, "chosen": c, "rejected": r}) for i, (p, c, r) in enumerate(pairs)]


def test_identical_pairs_dropped_and_counted(tiny_tokenizer):
    examples, stats = build_pair_examples(_rows(("Q?", " A", " A"), ("Q?", " A", " B")), tiny_tokenizer, max_length=None)
    assert len(examples) == 1
    assert (stats.rows, stats.kept, stats.dropped_identical) == (2, 1, 1)


def test_truncation_modes(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = _rows(("one two three four", " five six seven eight nine ten", " no"))
    n_prompt = len(tok("one two three four").input_ids)
    limit = n_prompt + 2
    ex, stats = build_pair_examples(rows, tok, max_length=limit, truncation_mode="keep_start")
    assert stats.truncated == 1 and len(ex[0]["chosen_input_ids"]) == limit
    assert ex[0]["chosen_completion_mask"] == [0] * n_prompt + [1, 1]
    ex, stats = build_pair_examples(rows, tok, max_length=limit, truncation_mode="keep_end")
    assert stats.truncated == 1 and ex[0]["chosen_input_ids"][-1] == tok.eos_token_id
    assert len(ex[0]["chosen_input_ids"]) == limit
    ex, stats = build_pair_examples(rows, tok, max_length=limit, truncation_mode="drop")
    assert ex == [] and stats.dropped_too_long == 1
    # a prompt that fills max_length leaves no completion under keep_start: dropped
    ex, stats = build_pair_examples(rows, tok, max_length=n_prompt, truncation_mode="keep_start")
    assert ex == [] and stats.dropped_too_long == 1


def test_collate_layout():
    examples = [
        {"chosen_input_ids": [1, 2, 3], "chosen_completion_mask": [0, 1, 1], "rejected_input_ids": [1, 4], "rejected_completion_mask": [0, 1], "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
        {"chosen_input_ids": [5, 6], "chosen_completion_mask": [0, 1], "rejected_input_ids": [5, 7, 8, 9], "rejected_completion_mask": [0, 1, 1, 1], "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0},
    ]
    batch = collate_pairs(examples, pad_token_id=0)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; width 4
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1]]
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor([-1.0, -3.0]))


def test_empty_final_turn_in_transcript_is_an_eos_only_answer(tiny_tokenizer):
    # HH-RLHF has rows whose preferred final assistant turn is empty
    row = {"chosen": "\n\nHuman: say nothing\n\nAssistant: ", "rejected": "\n\nHuman: say nothing\n\nAssistant: Ok"}
    pair = parse_pair(row, "f:1")
    assert (pair.chosen, pair.rejected) == (" ", " Ok")
    examples, stats = build_pair_examples([("f:1", row)], tiny_tokenizer, max_length=None)
    assert stats.empty_completion == 1 and len(examples) == 1
    ids, mask = examples[0]["chosen_input_ids"], examples[0]["chosen_completion_mask"]
    completion = [t for t, m in zip(ids, mask) if m]
    assert completion[-1] == tiny_tokenizer.eos_token_id


def test_conversation_with_no_answer_after_prompt_is_an_error():
    user = {"role": "user", "content": "Q"}
    with pytest.raises(DataError, match="f:3: chosen or rejected has no message"):
        parse_pair({"chosen": [user], "rejected": [user, {"role": "assistant", "content": "B"}]}, "f:3")
