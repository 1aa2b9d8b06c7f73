"""Your own data: prompt/answer files (JSONL, CSV) and plain text, with a held-out part kept aside.

A prompt/answer file trains the answer given the prompt: the loss counts only the answer tokens, as
with the kit's own task (data.py), and an instruct model's chat template wraps the prompt. A text file
trains a causal LM on chunks of fixed length. A bad file gets a DataError that names its line.
"""

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .train import criterion


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and, where there is one, the line."""


@dataclass
class Dataset:
    """Training and held-out examples: (prompt, answer) pairs, or chunks of token ids for plain text."""

    kind: str  # "pairs" or "text"
    train: list
    held_out: list


def read_pairs(path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a .jsonl file ({"prompt": ..., "answer": ...} per line) or a .csv
    file with a header row naming the columns prompt and answer."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    pairs = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        pairs.append(_pair(row, path, number))
    return _nonempty(pairs, path)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with _open(path) as f:
        reader = csv.reader(f)
        try:
            header = [h.strip().lower() for h in next(reader, [])]
            if "prompt" not in header or "answer" not in header:
                raise DataError(f"{path}:1: the header row must name the columns prompt and answer, got {header}")
            pairs = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}")
                pairs.append(_pair(dict(zip(header, row, strict=True)), path, reader.line_num))
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
    return _nonempty(pairs, path)


def _pair(row, path: Path, number: int) -> tuple[str, str]:
    fields = ("prompt", "answer")
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip() for k in fields):
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{path}:{number}: needs non-empty strings \"prompt\" and \"answer\", found {found}")
    return row["prompt"], row["answer"]


def read_text(path) -> str:
    """The whole of a UTF-8 text file."""
    text = "".join(line for _, line in _lines(Path(path)))
    if not text.strip():
        raise DataError(f"{path}: the file holds no text")
    return text


def _lines(path: Path):
    """(line number, line) of a UTF-8 file; a line that is not UTF-8 is named."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text") from None


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return open(path, encoding="utf-8", newline="")


def _nonempty(pairs: list, path: Path) -> list:
    if not pairs:
        raise DataError(f"{path}: no examples in the file")
    return pairs


def chat_pairs(tokenizer, pairs) -> list[tuple[str, str]]:
    """Pairs with each prompt wrapped in the tokenizer's chat template, if it has one (instruct models)."""
    if not getattr(tokenizer, "chat_template", None):
        return [(p, a if a.startswith((" ", "\n")) else " " + a) for p, a in pairs]
    return [(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True), a) for p, a in pairs]


def load_data(path, tokenizer, held_out: float = 0.2, seed: int = 0, chunk: int = 64) -> Dataset:
    """A Dataset from a .jsonl, .csv or .txt file; a seeded `held_out` share of the examples is kept aside."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json", ".csv"):
        examples, kind = chat_pairs(tokenizer, read_pairs(path)), "pairs"
    elif path.suffix.lower() in (".txt", ".md", ".text"):
        ids = tokenizer(read_text(path), add_special_tokens=False).input_ids
        examples, kind = [ids[i:i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)], "text"
        if not examples:
            raise DataError(f"{path}: {len(ids)} tokens, fewer than one chunk of {chunk}")
    else:
        raise DataError(f"{path}: unknown kind of file; use .jsonl or .csv (prompt, answer) or .txt (plain text)")
    order = random.Random(seed).sample(range(len(examples)), k=len(examples))
    n_held = math.ceil(held_out * len(examples)) if len(examples) > 1 else 0
    return Dataset(kind, [examples[i] for i in order[n_held:]], [examples[i] for i in order[:n_held]])


def text_batches(chunks, batch_size: int = 8, seed: int = 0):
    """Endless shuffled batches of text chunks: every token is labelled (causal LM)."""
    rng = random.Random(seed)
    while True:
        order = rng.sample(chunks, k=len(chunks))
        for i in range(0, max(1, len(order) - batch_size + 1), batch_size):
            ids = torch.tensor(order[i:i + batch_size])  # (B, T)
            yield {"input_ids": ids, "labels": ids.clone()}


@torch.no_grad()
def perplexity(learner, chunks, batch_size: int = 8) -> tuple[float, float]:
    """(mean next-token loss in nats, perplexity) of `learner` on text chunks."""
    losses, counts = [], []
    for i in range(0, len(chunks), batch_size):
        ids = torch.tensor(chunks[i:i + batch_size])  # (B, T)
        losses.append(float(criterion(learner.logits(ids), ids)))
        counts.append(ids.numel())
    loss = sum(x * n for x, n in zip(losses, counts, strict=True)) / sum(counts)
    return loss, math.exp(loss)
