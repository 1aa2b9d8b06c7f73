"""The kit's task: facts about made-up places, which no pretrained model can know; and plain sentences it knows.

Each example is a prompt and a one-word answer. The model starts at an exact-match score of
zero and learns the facts in a few dozen CPU steps; the loss counts only the answer tokens.
The plain sentences (`natural`) measure what training costs the model on text it already reads well.
"""

import random

import torch

PLACES = ["Zorbia", "Quellmar", "Vantoria", "Drelsk", "Ombrith", "Kestavo", "Pyrnell", "Ulvadon",
          "Marrowind", "Teskaro", "Brivane", "Caldurn", "Yssildor", "Gorvath", "Nimbrel", "Halvex"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "purple", "orange",
           "brown", "pink", "grey", "gold", "silver", "violet", "teal", "amber"]
ANIMALS = ["cat", "dog", "fox", "owl", "wolf", "bear", "horse", "goat",
           "frog", "duck", "lion", "deer", "crow", "seal", "mouse", "tiger"]

TEMPLATES = {
    "colour": ("Q: What colour is the flag of {place}?\nA:", COLOURS),
    "animal": ("Q: Which animal is the symbol of {place}?\nA:", ANIMALS),
}
# The same questions in other words, never trained on: whether what a model learned carries past its sentences.
REPHRASED = {
    "colour": ("Q: Which colour is {place}'s flag?\nA:", "Q: The flag of {place} is what colour?\nA:"),
    "animal": ("Q: What animal stands for {place}?\nA:", "Q: The symbol of {place} is which animal?\nA:"),
}


# Plain sentences of common knowledge, which the pretrained model reads well: its loss on them before and after
# training is what training cost it elsewhere.
NATURAL = ["The sun rises in the east and sets in the west.", "Water freezes at zero degrees Celsius.",
           "Paris is the capital of France.", "A week has seven days.", "Cats and dogs are common pets.",
           "The Pacific is the largest ocean on Earth.", "Bees make honey from the nectar of flowers.",
           "Most people sleep at night and work during the day.", "Trees lose their leaves in autumn.",
           "The moon goes around the Earth about once a month.", "Bread is made from flour, water and yeast.",
           "Children learn to read and write at school.", "Rain falls from clouds when the air is full of water.",
           "A bicycle has two wheels and a car has four.", "The heart pumps blood through the body.",
           "Music can make people feel happy or sad."]


def natural(n: int = 16) -> list[tuple[str, str]]:
    """n of NATURAL as (first word, the rest) pairs, so that `encode` labels every token after the first."""
    return [(s.split(" ", 1)[0], " " + s.split(" ", 1)[1]) for s in NATURAL[:n]]


def facts(kind: str = "colour", n: int = 16, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs; the answers are a seeded shuffle, so each place gets a made-up one."""
    template, answers = TEMPLATES[kind]
    answers = random.Random(seed).sample(answers, k=len(answers))
    return [(template.format(place=p), " " + a) for p, a in zip(PLACES[:n], answers, strict=False)]


def rephrase(pairs, kind: str = "colour") -> list[tuple[str, str]]:
    """The facts `pairs` (of `facts(kind)`) asked in each phrasing of REPHRASED[kind] in turn: len(REPHRASED[kind])
    times as many pairs, the answers unchanged."""
    head, tail = TEMPLATES[kind][0].split("{place}")
    places = []
    for prompt, _ in pairs:
        if not (prompt.startswith(head) and prompt.endswith(tail)):
            raise ValueError(f"not a {kind!r} fact: {prompt!r}")
        places.append(prompt[len(head):len(prompt) - len(tail)])
    return [(t.format(place=p), a) for t in REPHRASED[kind] for p, (_, a) in zip(places, pairs, strict=True)]


def encode(tokenizer, pairs, max_len: int | None = None) -> dict:
    """Right-padded input_ids (B, T) and labels (B, T): -100 except on the answer and end tokens."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    T = max_len or max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])[:, :T]  # (B, T)
    lab = torch.tensor([r + [-100] * (T - len(r)) for r in labels])[:, :T]  # (B, T)
    return {"input_ids": ids, "labels": lab}


def batches(tokenizer, pairs, batch_size: int = 8, seed: int = 0):
    """Endless shuffled batches over the pairs (an epoch at a time)."""
    rng = random.Random(seed)
    while True:
        order = rng.sample(pairs, k=len(pairs))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield encode(tokenizer, order[i:i + batch_size])
