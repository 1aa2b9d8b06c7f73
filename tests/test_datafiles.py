"""Your own data: JSONL, CSV and text files load into examples with a held-out part; bad lines are named."""

import pytest

from splitkit import load_model
from splitkit.training.datafiles import DataError, load_data, read_pairs, text_batches


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-llama")[1]


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_csv_give_the_same_pairs(tmp_path):
    jsonl = write(tmp_path, "a.jsonl", '{"prompt": "2+2=", "answer": "4"}\n\n{"prompt": "3+3=", "answer": "6"}\n')
    csv = write(tmp_path, "a.csv", 'prompt,answer\n2+2=,4\n"3+3=",6\n')
    assert read_pairs(jsonl) == read_pairs(csv) == [("2+2=", "4"), ("3+3=", "6")]


def test_a_held_out_part_is_kept_aside(tmp_path, tokenizer):
    rows = "".join(f'{{"prompt": "q{i}", "answer": "a{i}"}}\n' for i in range(10))
    data = load_data(write(tmp_path, "d.jsonl", rows), tokenizer, held_out=0.2)
    assert data.kind == "pairs" and len(data.train) == 8 and len(data.held_out) == 2
    assert not set(data.train) & set(data.held_out)


def test_text_is_cut_into_chunks_that_train_every_token(tmp_path, tokenizer):
    data = load_data(write(tmp_path, "t.txt", "split learning " * 40), tokenizer, chunk=16)
    assert data.kind == "text" and all(len(c) == 16 for c in data.train + data.held_out)
    batch = next(text_batches(data.train, batch_size=2))
    assert batch["input_ids"].shape == (2, 16) and bool((batch["labels"] == batch["input_ids"]).all())


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n', r"bad\.jsonl:2: not a JSON object"),
    ("bad.jsonl", '{"prompt": "a", "answer": "b"}\n\n{"question": "a"}\n', r"bad\.jsonl:3: needs non-empty strings"),
    ("bad.jsonl", '["a", "b"]\n', r"bad\.jsonl:1: needs non-empty strings .* found list"),
    ("bad.csv", "question,reply\nx,y\n", r"bad\.csv:1: the header row must name the columns prompt and answer"),
    ("bad.csv", "prompt,answer\nx,y\nx,y,z\n", r"bad\.csv:3: 3 fields, the header has 2"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl: no examples"),
    ("empty.txt", "   \n", r"empty\.txt: the file holds no text"),
    ("data.parquet", "x", r"unknown kind of file"),
])
def test_a_bad_file_gets_an_error_that_names_the_line(tmp_path, tokenizer, name, text, message):
    with pytest.raises(DataError, match=message):
        load_data(write(tmp_path, name, text), tokenizer)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.txt"])
def test_a_missing_file_gets_an_error_that_names_it(tmp_path, tokenizer, name):
    with pytest.raises(DataError, match=f"{name}: no such file"):
        load_data(tmp_path / name, tokenizer)


def test_a_line_that_is_not_utf8_is_named(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_data(path, tokenizer)


def test_an_instruct_model_gets_its_chat_template(smollm2):
    from splitkit.training.datafiles import chat_pairs

    _, tokenizer = smollm2
    (prompt, answer), = chat_pairs(tokenizer, [("What is 2+2?", "4")])
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in prompt
    assert answer == "4"


def test_a_model_without_a_chat_template_gets_the_plain_prompt(tokenizer):
    from splitkit.training.datafiles import chat_pairs

    assert chat_pairs(tokenizer, [("2+2=", "4")]) == [("2+2=", " 4")]


def test_the_kits_facts_rephrased_ask_each_place_for_its_own_answer_in_words_never_trained_on():
    from splitkit.core.data import REPHRASED, facts, rephrase

    pairs = facts("colour", 4, seed=3)
    asked = rephrase(pairs)
    assert len(asked) == len(REPHRASED["colour"]) * 4
    trained = {p for p, _ in pairs}
    for j, (prompt, answer) in enumerate(asked):
        place = pairs[j % 4][0].split("flag of ")[1].rstrip("?\nA:")
        assert place in prompt and prompt not in trained and answer == pairs[j % 4][1]
    with pytest.raises(ValueError, match="not a 'colour' fact"):
        rephrase(facts("animal", 1))
