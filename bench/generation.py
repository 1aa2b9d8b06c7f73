"""Generating through the split with KV caches, against the unsplit model's cached generate() and the uncached split.

Three ways to generate the same tokens from the same weights (LoRA on the client's blocks, as after
training in `full` mode): transformers' generate() on the unsplit model, splitkit's cached split
generation (the Trunk's cache on the trunk server, the Bottom's and Top's in the client) and the uncached
split path (the whole prefix through the three parts for every token). Greedy, with no stop at EOS, so
that every run makes exactly the same number of tokens; the three take turns, the median of several runs.

    python bench/generation.py                 # SmolLM2, cuts (10, 20), B = 1 and 8, 64 new tokens
    python bench/generation.py --server-device cuda
"""

import argparse
import time
from pathlib import Path

import torch

from _common import in_turns, write_table
from splitkit import Learner, load_model
from splitkit.data import facts
from splitkit.generation import generate_ids
from splitkit.models import SMOLLM2
from splitkit.testing import ServerProcess

WAYS = ("unsplit, cached", "split, cached", "split, uncached")


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
    p.add_argument("--server-device", default="cpu", help="where the trunk server runs the Trunk")
    p.add_argument("--out", default=None, help="folder for generation.md (default: bench/results)")
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model)
    n = args.new_tokens
    with ServerProcess(args.model, args.cuts, "--device", args.server_device) as server:
        unsplit = Learner(model, mode="local", cuts=args.cuts, train_trunk=False)  # LoRA on the client's blocks
        unsplit.model.get_base_model().generation_config.eos_token_id = None  # no stop at EOS (nor a ban on it)
        split = Learner(model, mode="full", cuts=args.cuts, address=server.address)
        run = {
            "unsplit, cached": lambda ids, mask: unsplit.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                pad_token_id=tokenizer.eos_token_id)[:, ids.shape[1]:],
            "split, cached": lambda ids, mask: generate_ids(split, ids, mask, n),
            "split, uncached": lambda ids, mask: generate_ids(split, ids, mask, n, cache=False),
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
            same[kind, batch] = all(torch.equal(tokens[w], tokens["unsplit, cached"]) for w in WAYS)
            rate = {w: batch * n / sorted(seconds[w])[len(seconds[w]) // 2] for w in WAYS}  # median tokens/s
            spread = {w: f"{min(batch * n / s for s in seconds[w]):.1f}–{max(batch * n / s for s in seconds[w]):.1f}"
                      for w in WAYS}
            for way in WAYS:
                vs_unsplit = rate[way] / rate["unsplit, cached"]
                vs_uncached = rate[way] / rate["split, uncached"]
                rows.append([kind, length, batch, way, f"{rate[way]:.1f}", spread[way],
                             f"{vs_unsplit:.2f}×" + (" ✓" if way == "split, cached" and vs_unsplit >= 0.85 else
                                                      " ✗" if way == "split, cached" else ""),
                             f"{vs_uncached:.1f}×" + (" ✓" if way == "split, cached" and vs_uncached >= 5 else
                                                      " ✗" if way == "split, cached" else "")])
        unsplit.close()
        split.close()

    notes = f"""
{args.model}, cuts {tuple(args.cuts)}, LoRA (r 8) on the client's blocks, {n} new tokens per prompt, greedy,
questions of the kit's task left-padded to the longest; trunk server in its own process on loopback, Trunk on
{args.server_device}. Tokens/s: batch × {n} / seconds, median of {args.reps} after {args.warmup} of warm-up
(the spread: slowest–fastest), the three ways in turns. Targets: split cached ≥ 0.85× the unsplit model's
cached generate() and ≥ 5× the uncached split. Every way made the same tokens as the unsplit model:
{", ".join(f"{k} B = {b}: {'yes' if s else 'NO'}" for (k, b), s in same.items())}.
Prompts: "chat" is each question in the model's chat template, as one asks an instruct model (SmolLM2's
adds its system prompt); "bare" is the question alone. The longer the prefix, the more the uncached path
recomputes for every token: its cost is what the cache saves.
"""
    write_table("generation", "Generation through the split: KV caches against the unsplit model and no cache",
                ["prompt", "prompt tokens", "B", "way", "tokens / s", "spread", "vs unsplit cached",
                 "vs split uncached"],
                rows, notes, out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
