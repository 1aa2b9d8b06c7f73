"""The quiet malicious server against the client's audit: what a server reads when it keeps the client's Bottom
public by answering with a smaller dL/dh1, and how often the client's two checks catch it (and cry wolf).

For each server (honest, or `quiet(scale)`: every dL/dh1 scaled by `scale`) and each seed, a `full` client trains
LoRA on the kit's 16 facts (AdamW, as the kit's learners do), audited by `splitkit.privacy.quiet.GradientAudit`:
its ratio check calibrated on 4 batches of its own through its own public Trunk, its exact audit on a secret share
of the steps. Then the client sends the private sentences (`splitkit.privacy.probes.SENTENCES`) through its trained
Bottom, and the server reads them back with the white-box search through the public Bottom (ranked by the learned
inversion, at most --budget candidates a position): tokens read, and positions read exactly (h1 equals the public
Bottom's for the token found, within rounding: the attacker knows that it read them right).

    python bench/quiet.py            # writes bench/results/privacy-quiet.md
"""

import argparse
from pathlib import Path

import torch

from _common import RESULTS, spread, write_table
from splitkit import Learner, load_model
from splitkit.core.data import batches, facts
from splitkit.core.models import SMOLLM2
from splitkit.core.split import Bottom
from splitkit.privacy.attacks import whitebox_search
from splitkit.privacy.probes import SENTENCES, SteeringServer, encode_sentences, fit_inversions
from splitkit.privacy.quiet import GradientAudit, quiet
from splitkit.training.train import evaluate


def one_run(model, tokenizer, scale: float, seed: int, public, inversion, args) -> dict:
    server = SteeringServer(model, args.cuts, bind="tcp://127.0.0.1:*", forge=None if scale == 1 else quiet(scale))
    address = server.start()
    pairs = facts()
    try:
        with Learner(model, mode="full", cuts=args.cuts, address=address, lr=args.lr) as learner:
            audit = GradientAudit(learner, model, share=args.share, widen=args.widen)  # the client's secret draw
            own = batches(tokenizer, pairs, 8, seed=1000 + seed)
            audit.calibrate([next(own) for _ in range(args.calibrate)])
            data, checks = batches(tokenizer, pairs, 8, seed=seed), []
            for _ in range(args.steps):
                learner.step(next(data))
                checks.append(audit.check())
            loss, exact = evaluate(learner, tokenizer, pairs)
            ids, mask = encode_sentences(tokenizer, SENTENCES[:args.sentences])
            with torch.no_grad():
                sent, base = learner.bottom(ids), public(ids)  # (S, T, d)
    finally:
        server.stop()
    # a server that answered zeros knows the client's Bottom is the public one: it goes on to the whole vocabulary
    # wherever the inversion's first candidates explain nothing (elsewhere that would try every token everywhere)
    budget = None if scale == 0 else args.budget
    read = explained = 0
    for s in range(len(ids)):
        n = int(mask[s].sum())
        found = whitebox_search(model, public, sent[s, :n], inversion=inversion, budget=budget)
        read += int((found["ids"] == ids[s, :n]).sum())
        explained += int((found["explained"] & (found["ids"] == ids[s, :n])).sum())
    moved = ((sent - base).norm(dim=-1) / base.norm(dim=-1))[mask.bool()]
    audited = [c for c in checks if c["audited"]]
    first = {kind: next((i + 1 for i, c in enumerate(checks) if c[f"{kind}_flag"]), None)
             for kind in ("ratio", "audit")}
    return {"moved": float(moved.median()), "read": read / int(mask.sum()), "exact": explained / int(mask.sum()),
            "loss": loss, "match": exact, "ratio_flags": sum(c["ratio_flag"] for c in checks) / len(checks),
            "audit_flags": sum(c["audit_flag"] for c in audited), "audited": len(audited),
            "first": first}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--steps", type=int, default=24, help="training steps of 8 facts")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=3, help="runs of each server (data order; LoRA starts are secret)")
    p.add_argument("--scales", nargs="*", type=float, default=[1, 1e-2, 1e-4, 1e-6, 0, -1],
                   help="what the server scales dL/dh1 by (1: honest; -1: negated, its norm kept)")
    p.add_argument("--share", type=float, default=0.25, help="the share of steps the client audits")
    p.add_argument("--widen", type=float, default=4.0, help="the ratio check's range, widened this much either way")
    p.add_argument("--calibrate", type=int, default=4, help="the client's own batches its ratio range comes from")
    p.add_argument("--sentences", type=int, default=6, help="private sentences the server reads back")
    p.add_argument("--budget", type=int, default=320, help="white-box candidates per position at most")
    p.add_argument("--fit-tokens", type=int, default=6144, help="random tokens the inversion is fitted on")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    public = Bottom(model, args.cuts[0])
    inversion = fit_inversions(model, [args.cuts[0]], n_tokens=args.fit_tokens)[args.cuts[0]]
    rows = []
    for scale in args.scales:
        runs = [one_run(model, tokenizer, scale, seed, public, inversion, args) for seed in range(args.seeds)]
        rows.append([{1: "honest", -1: "negated (×−1)"}.get(scale, f"quiet({scale:g})"),
                     spread([r["moved"] for r in runs], lambda v: f"{v:.2g}"),
                     spread([r["read"] for r in runs], lambda v: f"{v:.0%}"),
                     spread([r["exact"] for r in runs], lambda v: f"{v:.0%}"),
                     spread([r["loss"] for r in runs], lambda v: f"{v:.2f}"),
                     spread([r["match"] for r in runs], lambda v: f"{v:.0%}"),
                     spread([r["ratio_flags"] for r in runs], lambda v: f"{v:.0%}"),
                     f"{sum(r['audit_flags'] for r in runs)} of {sum(r['audited'] for r in runs)}",
                     *(", ".join("never" if r["first"][kind] is None else str(r["first"][kind]) for r in runs)
                       for kind in ("ratio", "audit"))])
        print(rows[-1], flush=True)
    a, b = args.cuts
    write_table("privacy-quiet", "The quiet malicious server against the client's audit", [
        "server", "h1 moved", "tokens read", "read exactly", "task loss", "exact match", "ratio flags",
        "audit flags, all runs", "first ratio flag", "first audit flag"], rows, f"""
{args.model}, cuts ({a}, {b}), `full`, AdamW at lr {args.lr:g}, {args.steps} steps of 8 facts; {args.seeds} runs of
each server (data orders 0..{args.seeds - 1}, secret LoRA starts), median (range). "quiet(s)": the server answers
s·dL/dh1 (0: zeros); "negated": −dL/dh1, a forgery whose norm is the honest one. "h1 moved": the median token's
‖h1 − public h1‖ / ‖public h1‖ on the {args.sentences} private sentences after training; "tokens read": the
white-box search through the public Bottom (inversion fitted on {args.fit_tokens} random tokens, at most
{args.budget} candidates a position, the whole vocabulary for quiet(0), whose server knows the Bottom is the public
one); "read exactly": read, and h1 equal to
the public Bottom's within rounding, so the attacker knows it is right. The client's checks
(`splitkit.privacy.quiet.GradientAudit`): "ratio flags", the share of steps whose ‖dL/dh1‖ / ‖dL/dh2‖ left the
range of {args.calibrate} batches of its own through its own public Trunk, widened {args.widen:g}× either way;
"audit flags", of all runs' audited steps (a secret {args.share:.0%} share of each run's), those whose dL/dh1
differs from the client's own by more than 10⁻³ relative; "first … flag": the step each check first flagged, per run.
On the honest server every flag is a false alarm.
""", out=args.out)


if __name__ == "__main__":
    main()
