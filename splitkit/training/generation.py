"""Generating text through the split, with KV caches on both sides of the wire.

The client keeps the Bottom's and the Top's caches, the trunk server the Trunk's (one per generation,
as Petals' servers keep attention caches); after the prompt, each new token sends one (B, 1, d) hidden
state each way. Prompts are left-padded with the mask and positions of transformers' generate(), so
greedy tokens are the unsplit model's. `cache=False` is the uncached path: the whole prefix through all
three parts for every token.
"""

import contextlib

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from ..core.lora import Merged
from ..core.split import left_padding, padding_of
from ..wire.client import TrunkError
from ..wire.protocol import LOCAL


@torch.no_grad()
def generate_ids(learner, input_ids, attention_mask=None, max_new_tokens: int = 32, *, eos_token_id=None,
                 pad_token_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 cache: bool = True, streamer=None) -> torch.Tensor:
    """New tokens (B, ≤ max_new_tokens) for left-padded prompts (B, T); a finished row is padded with
    `pad_token_id` after its EOS. temperature 0 is greedy; `streamer` is a transformers streamer."""
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pad = padding_of(attention_mask)  # (B,) left padding of each row
    if bool((pad == input_ids.shape[1]).any()):
        raise ValueError("every prompt needs at least one token")
    pick = _sampler(temperature, top_p, seed)
    ids, step, start = input_ids, input_ids, 0  # all tokens so far; what goes in next; where it starts
    done = torch.zeros(len(ids), dtype=torch.bool)
    if streamer is not None:
        streamer.put(input_ids)
    try:
        with _Run(learner, pad.tolist(), cache) as run:
            for _ in range(max_new_tokens):
                logits = run(step, start)[:, -1]  # (B, vocab): the next token's, the only one computed
                token = torch.where(done, pad_token_id, pick(ids, logits))  # (B,)
                ids = torch.cat([ids, token[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(token)
                done |= torch.isin(token, torch.tensor(_as_list(eos_token_id)))
                if done.all():
                    break
                step, start = (token[:, None], ids.shape[1] - 1) if cache else (ids, 0)
    finally:
        if streamer is not None:
            streamer.end()
    return ids[:, input_ids.shape[1]:]


def generate(learner, tokenizer, prompts, max_new_tokens: int = 32, **options) -> list[str]:
    """The continuation of each prompt (a list of strings), batched with left padding; options as generate_ids."""
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(map(len, rows))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    new = generate_ids(learner, input_ids, mask, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=pad_id, **options)
    return [tokenizer.decode(_until_eos(row, tokenizer.eos_token_id), skip_special_tokens=True) for row in new]


def exact_match(learner, tokenizer, pairs, max_new_tokens: int = 4) -> tuple[float, list[str]]:
    """Fraction of prompts whose greedy answer (first line) equals the expected one; and the answers."""
    answers = generate(learner, tokenizer, [p for p, _ in pairs], max_new_tokens)
    hits = [is_exact(a, want) for a, (_, want) in zip(answers, pairs, strict=True)]
    return sum(hits) / len(pairs), answers


def is_exact(answer: str, want: str) -> bool:
    """Whether a generated answer's first line is the expected answer (spaces around either do not count)."""
    return answer.strip().split("\n")[0] == want.strip()


class _Run:
    """The next-token logits of one generation, through the learner's parts (or its unsplit model). A context:
    inside it the client's LoRA is merged into its base weights (nothing trains during a generation), and on
    the way out, whatever happened, the weights are the very tensors they were and the server's cache is let go."""

    def __init__(self, learner, pad: list, cache: bool):
        self.learner, self.pad, self.cache = learner, pad, cache
        self.caches = [DynamicCache(config=learner.config) for _ in range(2)] if cache else [None, None]
        self.gen = learner.client.new_generation() if cache and learner.client else None
        self.sent = []  # the h1 of each step so far, (B, t, d) each: sent again if the server lost the Trunk's cache
        self.merged = contextlib.ExitStack()

    def __enter__(self):
        with self.merged:  # a merge that fails leaves each part as it was
            for part in (self.learner.model, self.learner.bottom, self.learner.top):
                if part is not None:
                    self.merged.enter_context(Merged(part))
            self.merged = self.merged.pop_all()  # merged until __exit__
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        finally:
            self.merged.close()

    def __call__(self, ids, start: int):  # (B, T) -> logits (B, 1, vocab): the last position's
        mask, positions = left_padding(self.pad, start, start + ids.shape[1])  # (B, start + T), (B, T)
        parts = dict(attention_mask=mask, position_ids=positions)
        if self.learner.mode == LOCAL:
            return self.learner.model(input_ids=ids, past_key_values=self.caches[0], use_cache=self.cache,
                                      logits_to_keep=1, **parts).logits
        h1 = self.learner.guard.h1(self.learner.bottom(ids, past_key_values=self.caches[0], **parts))  # (B, T, d)
        client = self.learner.client
        if self.cache:
            h2 = client.infer(h1, self.gen, start, self.pad, self._prefix if self.sent else None)
            self.sent.append(h1)
        else:
            h2 = client.forward(h1, pad=self.pad)  # (B, T, d)
        return self.learner.top(h2, past_key_values=self.caches[1], logits_to_keep=1, **parts)  # (B, 1, vocab)

    def _prefix(self) -> torch.Tensor:  # (B, start, d)
        """The h1 of every position so far, joined only when the server asks for it again (cache_missing);
        kept joined, so that a later resend joins only the steps after this one."""
        self.sent[:] = [torch.cat(self.sent, dim=1)]
        return self.sent[0]

    def close(self):
        if self.gen is not None:
            with contextlib.suppress(TrunkError):  # the cache idles out on the server anyway
                self.learner.client.release(self.gen)


def _sampler(temperature: float, top_p: float, seed: int):
    """next_token(ids, logits) -> (B,): argmax at temperature 0, else sampled with transformers' warpers."""
    if temperature == 0:
        return lambda ids, logits: logits.argmax(dim=-1)
    if not 0 < top_p <= 1 or temperature < 0:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    generator = torch.Generator().manual_seed(seed)

    def sample(ids, logits):
        probs = torch.softmax(warp(ids, logits.float()), dim=-1)  # (B, vocab)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return sample


def _as_list(token_ids) -> list:
    return [] if token_ids is None else [token_ids] if isinstance(token_ids, int) else list(token_ids)


def _until_eos(row, eos_token_id) -> list:
    tokens = row.tolist()
    for i, t in enumerate(tokens):
        if t in _as_list(eos_token_id):
            return tokens[:i]
    return tokens
