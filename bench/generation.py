"""Generating through the split with KV caches, against the unsplit model's cached generate() and the uncached split.

Four ways to generate the same tokens from the same weights (a LoRA on the client's blocks, as after
training in `full` mode): transformers' generate() on the plain unsplit model (a copy whose LoRA PEFT has
merged and unloaded: no LoRA layer left), transformers' generate() on the unsplit model with PEFT's LoRA
layers (unmerged), splitkit's cached split generation (the Trunk's cache on the trunk server, the Bottom's
and Top's in the client, the client's LoRA merged for the generation) and the uncached split path (the
whole prefix through the three parts for every token). Greedy, with no stop at EOS, so that every run makes
exactly the same number of tokens; the four take turns, the median of several runs.

    python bench/generation.py                 # SmolLM2, cuts (10, 20), B = 1 and 8, 64 new tokens
    python bench/generation.py --server-device cuda
"""

import argparse
import copy
import os
import time
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from _common import in_turns, write_table
from splitkit import Learner, LoraSpec, load_model
from splitkit.core.data import facts
from splitkit.core.models import SMOLLM2
from splitkit.training.generation import generate_ids
from splitkit.training.testing import ServerProcess

WAYS = ("plain unsplit, cached", "unsplit with LoRA layers, cached", "split, cached", "split, uncached")
PLAIN, SPLIT, UNCACHED = WAYS[0], WAYS[2], WAYS[3]


def prompts(tokenizer, batch: int, chat: bool):
    """Left-padded questions of the kit's task (B, T), bare or in the model's chat template, and their mask."""
    questions = [p for p, _ in facts(n=batch)]
    if chat:
        rows = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]) for q in questions]
    else:
        rows = [tokenizer(q, add_special_tokens=False).input_ids for q in questions]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    return ids, mask


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--init-b", type=float, default=0.01, help="std of the LoRA's random B (0: a LoRA that is a no-op)")
    p.add_argument("--server-device", default="cpu", help="where the trunk server runs the Trunk")
    p.add_argument("--out", default=None, help="folder for generation.md (default: bench/results)")
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model)
    n = args.new_tokens
    with ServerProcess(args.model, args.cuts, "--device", args.server_device) as server:
        lora = LoraSpec(init_b=args.init_b).resolved()  # one start, a secret one, for every way
        unsplit = Learner(model, mode="local", cuts=args.cuts, lora=lora, train_trunk=False)  # the client's blocks
        unsplit.model.get_base_model().generation_config.eos_token_id = None  # no stop at EOS (nor a ban on it)
        plain = copy.deepcopy(unsplit.model).merge_and_unload()  # the same weights, W + scaling · B A, no LoRA layer
        assert not any(isinstance(m, LoraLayer) for m in plain.modules())
        split = Learner(model, mode="full", cuts=args.cuts, address=server.address, lora=lora)

        def transformers_generate(causal_lm):
            def new_tokens(ids, mask):
                return causal_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                          pad_token_id=tokenizer.eos_token_id)[:, ids.shape[1]:]
            return new_tokens

        run = {
            PLAIN: transformers_generate(plain),
            "unsplit with LoRA layers, cached": transformers_generate(unsplit.model),
            SPLIT: lambda ids, mask: generate_ids(split, ids, mask, n),
            UNCACHED: lambda ids, mask: generate_ids(split, ids, mask, n, cache=False),
        }
        rows, same = [], {}
        kinds = ["chat", "bare"] if tokenizer.chat_template else ["bare"]
        for kind, batch in [(k, b) for k in kinds for b in args.batches]:
            ids, mask = prompts(tokenizer, batch, kind == "chat")
            length = f"{int(mask.sum(1).min())}–{int(mask.sum(1).max())}" if batch > 1 else f"{int(mask.sum())}"
            seconds, tokens = {w: [] for w in WAYS}, {}
            for i in range(args.warmup + args.reps):
                for way in in_turns(WAYS, i):
                    t0 = time.perf_counter()
                    tokens[way] = run[way](ids, mask)
                    if i >= args.warmup:
                        seconds[way].append(time.perf_counter() - t0)
            same[kind, batch] = all(torch.equal(tokens[w], tokens[PLAIN]) for w in WAYS)
            rate = {w: batch * n / sorted(seconds[w])[len(seconds[w]) // 2] for w in WAYS}  # median tokens/s
            spread = {w: f"{min(batch * n / s for s in seconds[w]):.1f}–{max(batch * n / s for s in seconds[w]):.1f}"
                      for w in WAYS}
            for way in WAYS:
                over = 1000 * batch * (1 / rate[way] - 1 / rate[PLAIN])  # ms per step (one token a row) over plain
                rows.append([kind, length, batch, way, f"{rate[way]:.1f}", spread[way], f"{over:+.1f}",
                             mark(rate[way] / rate[PLAIN], 0.9, way == SPLIT, "{:.2f}×"),
                             mark(rate[way] / rate[WAYS[1]], None, False, "{:.2f}×"),
                             mark(rate[way] / rate[UNCACHED], 5, way == SPLIT, "{:.1f}×")])
        unsplit.close()
        split.close()

    notes = f"""
{args.model}, cuts {tuple(args.cuts)}, LoRA (r {lora.r}, B drawn with std {args.init_b}) on the client's blocks, {n} new
tokens per prompt, greedy, questions of the kit's task left-padded to the longest; trunk server in its own process
on loopback, Trunk on {args.server_device}; the server's OpenMP threads wait passively (trunk_server.py sets
OMP_WAIT_POLICY=PASSIVE unless the environment sets it), this process's as the environment says
({os.environ.get("OMP_WAIT_POLICY", "not set")}). Tokens/s: batch × {n} / seconds, median of {args.reps} after
{args.warmup} of warm-up (the spread: slowest–fastest), the four ways in turns. "plain unsplit": transformers'
generate() on a copy of the model whose LoRA PEFT merged and unloaded (merge_and_unload: no LoRA layer left);
"unsplit with LoRA layers": on the unsplit model with PEFT's LoRA layers, unmerged (two more matmuls per
layer per token). The split merges the client's LoRA into its weights for each generation (splitkit.core.lora.Merged)
and puts the very weights back after it; its Top computes the LM head at the last position only, as generate()
does. "ms / step over plain": the time of one step (one new token in every row) less the plain model's, from the
medians. Targets: split cached ≥ 0.9× the plain unsplit model's cached generate() and ≥ 5× the uncached split.
Every way made the same tokens as the plain unsplit model:
{", ".join(f"{k} B = {b}: {'yes' if s else 'NO'}" for (k, b), s in same.items())}.
Prompts: "chat" is each question in the model's chat template, as one asks an instruct model (SmolLM2's
adds its system prompt); "bare" is the question alone. The longer the prefix, the more the uncached path
recomputes for every token: its cost is what the cache saves.
"""
    write_table("generation", "Generation through the split: KV caches against the unsplit model and no cache",
                ["prompt", "prompt tokens", "B", "way", "tokens / s", "spread", "ms / step over plain", "vs plain",
                 "vs LoRA layers",
                 "vs split uncached"],
                rows, notes, out=args.out and Path(args.out))


def mark(ratio: float, target: float | None, marked: bool, form: str) -> str:
    """A ratio, with ✓ or ✗ against a target on the row that has one."""
    return form.format(ratio) + ((" ✓" if ratio >= target else " ✗") if marked else "")


if __name__ == "__main__":
    main()
