"""The privacy–utility trade-off: each defence at several settings, against the strongest of the attacks a server has
that knows the public weights and the defence, and not the client's seeds.

For each setting a `full` client trains LoRA on the kit's 16 facts for a fixed budget, through a curious server
(splitkit.privacy.probes.CuriousServer) that keeps every step's h1, three times (each with its own data order; the
client's LoRA start and noise are secret). Then:
- utility: the task's loss and exact match on the 16 facts, loss on 16 facts it never saw (held out) and on plain
  sentences of common knowledge before and after training, all through the client's parts with its defence on;
- the input: the client sends the private sentences (splitkit.privacy.probes.SENTENCES) through its trained Bottom and
  its defence, several times; the server reads them back with the white-box search through the public Bottom and
  through the Bottom it tracked over training (`splitkit.privacy.track`), through a shadow Bottom against NoPeek,
  by maximum-likelihood decoding under noise (`splitkit.privacy.ml_decode`, the sends combined) and by the learned
  inversion refitted through the defence; tokens read back exactly, and secrets (SECRETS) read back whole, and the
  strongest of these per setting;
- the labels: from the last step's dL/dh2 the server picks each row's answer among the task's 16 possible ones
  (splitkit.privacy.attacks.answer_match, under the public Top);
- the cost: the median step time against no defence's, side by side in the same run.

    python bench/privacy.py            # writes bench/results/privacy.md and privacy.png

At its defaults the frontier (10 settings, 3 runs each) takes about an hour on 2 CPU cores (privacy.md's
"seconds" column: each row's), then the sweep over the cuts (privacy-cuts.md) a few minutes more; `--sweep-cuts`
with no value skips it.
"""

import argparse
import statistics
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from _common import RESULTS, in_turns, timed_step, write_table
from splitkit import Learner, LoraSpec, load_model
from splitkit.core.data import batches, encode, facts, natural
from splitkit.core.models import SMOLLM2
from splitkit.core.split import Bottom, split_model
from splitkit.privacy.attacks import answer_match, linear_read, secrets_recovered, shadow_bottom, whitebox_sentences
from splitkit.privacy.decoding import ml_sentences
from splitkit.privacy.probes import SECRETS, SENTENCES, CuriousServer, encode_sentences, fit_inversions
from splitkit.privacy.tracking import track
from splitkit.training.defences import Defence
from splitkit.training.train import criterion, evaluate


def settings(h1_bound: float, g2_bound: float, a: int, depths, snrs=(16, 1, 0.25), lams=(10, 100),
             zs=(1,)) -> list[tuple]:
    """(defence, setting, first cut, Defence) for every row of the table."""
    rows = [("none", "-", a, Defence())]
    rows += [("cut depth", f"a = {c}", c, Defence()) for c in depths if c != a]
    rows += [("h1 clip + noise", f"SNR {snr:g}", a, Defence(h1_clip=h1_bound, h1_snr=snr)) for snr in snrs]
    rows += [("NoPeek", f"λ = {lam:g}", a, Defence(nopeek=lam)) for lam in lams]
    rows += [("dL/dh2 clip + noise", f"z = {z:g}", a, Defence(g2_clip=g2_bound, g2_noise=z)) for z in zs]
    rows += [("max-norm alignment", "-", a, Defence(g2_maxnorm=True))]
    return rows


@torch.no_grad()
def bounds(model, tokenizer, cuts) -> tuple[float, float]:
    """The clipping bounds, from the untrained model on the task: the 90th percentile of h1's token norms, and
    the median of dL/dh2's row norms."""
    bottom, trunk, top = split_model(model, cuts)
    batch = encode(tokenizer, facts())
    h1 = bottom(batch["input_ids"])
    h2 = trunk(h1).requires_grad_(True)
    with torch.enable_grad():
        (g2,) = torch.autograd.grad(criterion(top(h2), batch["labels"]), h2)
    return float(h1.norm(dim=-1).flatten().quantile(0.9)), float(g2.flatten(1).norm(dim=1).median())


def one_run(model, tokenizer, a: int, b: int, defence: Defence, seed: int, args, public) -> dict:
    """One client trained with `defence` through a curious server that keeps every step's h1, then every attack the
    server has on what that client sends next. The client's LoRA start and noise are its secrets; `seed` orders its
    data."""
    started = time.perf_counter()
    server = CuriousServer(model, (a, b), bind="tcp://127.0.0.1:*")
    address = server.start()
    pairs, held_out = facts(), facts("animal")
    answers = [tokenizer(ans, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
               for ans in sorted({ans for _, ans in pairs})]
    try:
        with Learner(model, mode="full", cuts=(a, b), address=address, lr=args.lr, defence=defence) as learner:
            natural_before, _ = evaluate(learner, tokenizer, natural())
            data, seconds, observed = batches(tokenizer, pairs, 8, seed=seed), [], []
            for _ in range(args.steps):
                batch = next(data)
                server.seen.clear()
                t0 = time.perf_counter()
                learner.step(batch)
                seconds.append(time.perf_counter() - t0)
                observed.append(server.seen[0][1][0])  # the step's h1, as the server received it
            train_loss, exact = evaluate(learner, tokenizer, pairs)
            held_loss, _ = evaluate(learner, tokenizer, held_out)
            natural_after, _ = evaluate(learner, tokenizer, natural())
            # the labels: the last step's dL/dh2, and the h2 the server computed for it
            (h1_seen,), (g2_seen,) = server.seen[0][1], server.seen[1][1]
            bottom, trunk, top = public[a]
            h2 = trunk(h1_seen)
            prompts = [int((row != -100).nonzero()[0, 0]) for row in batch["labels"]]
            truth = [_which(answers, row, p) for row, p in zip(batch["labels"], prompts, strict=True)]
            picked = answer_match(top, h2, g2_seen, prompts, answers)
            labels = sum(x == y for x, y in zip(picked, truth, strict=True)) / len(truth)
            # the input: the private sentences through the client's trained Bottom and its defence, sent `repeats`
            # times (fresh noise each time), as training sends each fact
            ids, mask = encode_sentences(tokenizer, SENTENCES[:args.sentences])
            with torch.no_grad():
                clean = learner.bottom(ids)
                sends = torch.stack([learner.guard.h1(clean) for _ in range(args.repeats)])  # (n, S, T, d)
    finally:
        server.stop()
    read, spent = {}, {}  # spent: seconds of the client's run and of each attack

    def lap(name):  # the seconds since the last lap, as `name`'s
        nonlocal last
        now = time.perf_counter()
        spent[name], last = now - last, now

    last = started
    lap("client")

    def score(name, got):  # `got`: the attack's reading; its seconds are those since the last attack's end
        read[name] = float(((got == ids) & mask).sum() / mask.sum())
        read[name + " secrets"] = sum(secrets_recovered(tokenizer, SENTENCES[:args.sentences],
                                                        SECRETS[:args.sentences], ids, got)) / len(ids)
        lap(name)

    # the attacker's adaptive inversion, fitted with noise of its own at the noise of one send
    inversion = fit_inversions(model, [a], n_tokens=args.fit_tokens, defence=defence if defence.on else None)[a]
    search = {"inversion": inversion, "defence": defence, "budget": args.budget}
    reading = {**search, "margin": 0.5}  # after training nothing is explained exactly: stop at a clear margin
    score("public", whitebox_sentences(model, bottom, sends[0], mask, **reading))
    if a == args.cuts[0]:  # the tracker at the table's cut (the cut-depth rows: the public search alone)
        every = observed[(len(observed) - 1) % args.track_every::args.track_every]  # the last step always
        followed = track(model, (a, b), every, fit_steps=args.fit_steps, margin=0.5, **search)
        tracked = followed.bottom
        lap("tracking")
        with torch.no_grad():  # how far the tracked Bottom misses, per coordinate: its residual less noise
            residual = float((tracked(followed.ids[-1]) - every[-1]).pow(2).mean())
        mismatch = max(0.0, residual - defence.h1_sigma(every[-1].shape[-1]) ** 2)
        score("tracked", whitebox_sentences(model, tracked, sends[0], mask, **reading))
    if defence.nopeek:  # it acts through training: the attacker also trains a shadow Bottom the same way
        shadow = shadow_bottom(model, tokenizer, (a, b), defence, args.steps, args.lr, facts("animal"), seed=seed + 1)
        score("shadow", whitebox_sentences(model, shadow, sends[0], mask, **reading))
    if defence.h1_snr is not None:  # noise: the likelihood of all the sends (06a: one send against twelve)
        several = replace(defence, h1_snr=defence.h1_snr * args.repeats)  # the mean of n sends: n times the SNR
        mean_inv = fit_inversions(model, [a], n_tokens=args.fit_tokens, defence=several)[a]
        score(f"ML, {args.repeats} sends", ml_sentences(model, tracked, sends, mask, defence, inversion=mean_inv,
                                                        mismatch=mismatch))
    score("inversion", linear_read(model, sends[0], inversion, mask))
    return {"train": train_loss, "held": held_loss, "exact": exact, "labels": labels, "natural_before":
            natural_before, "natural_after": natural_after, "step_s": statistics.median(seconds[1:]), "read": read,
            "seconds": spent}


def _which(answers, row, start) -> int:
    """The index of the answer whose tokens the labels hold from `start`."""
    return next(i for i, ans in enumerate(answers) if row[start:start + len(ans)].tolist() == ans)


def pareto(points) -> list[int]:
    """Indices of the points that no other point beats on both: lower attack success and higher utility."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points)]


def fmt(values, pct=True) -> str:
    """The median, and the range in brackets where it shows at this precision."""
    one = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.2f}")
    low, high = one(min(values)), one(max(values))
    return one(statistics.median(values)) + (f" ({low}–{high})" if low != high else "")


def sweep(model, tokenizer, b: int, args) -> tuple[list[list], float]:
    """The white-box search at each first cut, on the base weights and after training: one `local` run (LoRA on
    every block, whose gradients equal full+trunk's at any cut) gives the trained Bottom at every cut at once."""
    ids, mask = encode_sentences(tokenizer, SENTENCES[:args.sentences])
    texts, secrets = SENTENCES[:args.sentences], SECRETS[:args.sentences]
    local = Learner(model, mode="local", cuts=(1, b), lr=args.lr)
    for batch in islice(batches(tokenizer, facts(), 8, seed=0), args.steps):
        local.step(batch)
    _, exact = evaluate(local, tokenizer, facts())
    with torch.no_grad():
        states = {"base": model(input_ids=ids, output_hidden_states=True).hidden_states,
                  "trained": local.model(input_ids=ids, output_hidden_states=True).hidden_states}
    inversions = fit_inversions(model, args.sweep_cuts, n_tokens=args.fit_tokens)
    rows = []
    for a in args.sweep_cuts:
        bottom, row = Bottom(model, a), [a]
        for name, budget in (("base", args.sweep_budget), ("trained", args.budget)):
            t0 = time.perf_counter()
            read = whitebox_sentences(model, bottom, states[name][a], mask, inversion=inversions[a], budget=budget)
            row += [f"{float(((read == ids) & mask).sum() / mask.sum()):.0%}",
                    f"{sum(secrets_recovered(tokenizer, texts, secrets, ids, read))}/{len(texts)}",
                    f"{time.perf_counter() - t0:.0f}"]
        rows.append(row)
        print("sweep", row, flush=True)
    return rows, exact


def overhead(model, tokenizer, cuts, h1_bound: float, g2_bound: float, args) -> list[list]:
    """Seconds per training step with each kind of defence against none, side by side: one learner each on one
    server, the same batch, steps in turns (so that the machine's drift falls on every variant alike)."""
    variants = {"none": Defence(), "h1 clip + noise (SNR 1)": Defence(h1_clip=h1_bound, h1_snr=1.0),
                "NoPeek (λ = 10)": Defence(nopeek=10.0), "dL/dh2 clip + noise (z = 0.3)":
                    Defence(g2_clip=g2_bound, g2_noise=0.3), "max-norm alignment": Defence(g2_maxnorm=True)}
    server = CuriousServer(model, cuts, bind="tcp://127.0.0.1:*")
    address = server.start()
    batch = encode(tokenizer, facts()[:8])
    start = LoraSpec().resolved()  # one start, a secret one, for every variant
    learners = {name: Learner(model, mode="full", cuts=cuts, address=address, lr=args.lr, defence=d, lora=start)
                for name, d in variants.items()}
    seconds = {name: [] for name in variants}
    try:
        for rep in range(args.overhead_reps + 1):
            for name in in_turns(variants, rep):
                server.seen.clear()
                _, s, _ = timed_step(learners[name], batch)
                if rep:  # the first round warms up
                    seconds[name].append(s)
    finally:
        for learner in learners.values():
            learner.close()
        server.stop()
    base = statistics.median(seconds["none"])
    return [[name, f"{1000 * statistics.median(v):.0f}", f"{1000 * min(v):.0f}–{1000 * max(v):.0f}",
             f"{statistics.median(v) / base:.2f}×"] for name, v in seconds.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--steps", type=int, default=24, help="training steps of 8 facts (the fixed budget)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=3, help="runs of each setting")
    p.add_argument("--repeats", type=int, default=12, help="times the client sends each private sentence")
    p.add_argument("--fit-steps", type=int, default=30, help="least-squares steps of the tracker a step it reads")
    p.add_argument("--track-every", type=int, default=24, help="the tracker reads every k-th step, the last included")
    p.add_argument("--sentences", type=int, default=4, help="private sentences the server reads back")
    p.add_argument("--budget", type=int, default=320, help="white-box candidates per position at most")
    p.add_argument("--fit-tokens", type=int, default=6144, help="random tokens the inversions are fitted on")
    p.add_argument("--snrs", nargs="*", type=float, default=[16, 1, 0.25], help="SNRs of the h1 noise rows")
    p.add_argument("--lams", nargs="*", type=float, default=[10, 100], help="NoPeek's weights")
    p.add_argument("--zs", nargs="*", type=float, default=[1], help="dL/dh2 noise multipliers")
    p.add_argument("--depths", nargs="*", type=int, default=[1, 15], help="other first cuts, undefended")
    p.add_argument("--sweep-cuts", nargs="*", type=int, default=list(range(1, 16)),
                   help="first cuts of the white-box sweep (none: no sweep)")
    p.add_argument("--sweep-budget", type=int, default=1344, help="white-box candidates per position in the sweep, "
                                                                  "on the base weights")
    p.add_argument("--overhead-reps", type=int, default=10, help="timed steps per defence in the overhead table")
    p.add_argument("--overhead-only", action="store_true", help="write only the step-time overhead table")
    p.add_argument("--only", nargs="*", help="run only these defences (names as in the table)")
    p.add_argument("--name", default="privacy", help="the table's file name in --out")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    a, b = args.cuts
    h1_bound, g2_bound = bounds(model, tokenizer, (a, b))
    if args.overhead_reps:
        write_table("privacy-overhead", "Step time with each defence, side by side", ["defence", "median ms",
                    "range ms", "against none"], overhead(model, tokenizer, (a, b), h1_bound, g2_bound, args), f"""
{args.model}, cuts ({a}, {b}), `full`, a step of 8 facts; {args.overhead_reps} steps each, one learner per defence on
one server, in turns after a round of warm-up. Median and range over the steps.
""", out=args.out)
    if args.overhead_only:
        return
    rows_spec = [r for r in settings(h1_bound, g2_bound, a, args.depths, args.snrs, args.lams, args.zs)
                 if not args.only or r[0] in args.only]
    public = {c: (Bottom(model, c), *split_model(model, (c, b))[1:]) for c in {r[2] for r in rows_spec}}
    results, baseline_s = [], None
    for name, setting, cut, defence in rows_spec:
        t0 = time.perf_counter()
        runs = [one_run(model, tokenizer, cut, b, defence, seed, args, public) for seed in range(args.seeds)]
        attacks = [k for k in runs[0]["read"] if not k.endswith("secrets")]  # the strongest: the most, at its median
        best = max(attacks, key=lambda k: (statistics.median(r["read"][k] for r in runs), k != "inversion"))
        for r in runs:
            r["strongest"], r["secrets"], r["attack"] = r["read"][best], r["read"][best + " secrets"], best
        if name == "none":
            baseline_s = statistics.median(r["step_s"] for r in runs)
        results.append((name, setting, cut, runs))
        print(name, setting, best, {k: round(statistics.median(r["read"][k] for r in runs), 3) for k in attacks},
              {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]
               if k not in ("read", "attack", "seconds")},
              {k: round(statistics.median(r["seconds"][k] for r in runs)) for k in runs[0]["seconds"]},
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        write_frontier(results, baseline_s, args, (a, b), h1_bound, g2_bound)  # after each row: a partial table
    points = write_frontier(results, baseline_s, args, (a, b), h1_bound, g2_bound)
    figure(results, *points, args.out / f"{args.name}.png")
    if args.sweep_cuts:
        rows, exact = sweep(model, tokenizer, b, args)
        write_table("privacy-cuts", "The white-box search at each first cut, on the base weights and after training",
                    ["a", "base: tokens", "base: secrets", "base: s", "trained: tokens", "trained: secrets",
                     "trained: s"], rows, f"""
{args.model}, {args.sentences} private sentences. "base": h1 from the public Bottom (a client at step 0), at most
{args.sweep_budget} candidates per position. "trained": h1 from a Bottom whose LoRA trained {args.steps} steps of 8
facts at lr {args.lr} (exact match {exact:.0%} on the 16 facts; trained as `local`, LoRA on every block, which gives
the gradients of `full+trunk` at any cut, so one run gives the trained Bottom of every cut), at most {args.budget}
candidates per position; the server searches through the public Bottom, not knowing the LoRA. s: seconds the
search took on this machine.
""", out=args.out)


def write_frontier(results, baseline_s, args, cuts, h1_bound: float, g2_bound: float):
    """Write the frontier's table of the rows measured so far; the points (strongest read, exact match) and
    (labels, exact match) of each row."""
    a, b = cuts
    points = [(statistics.median(r["strongest"] for r in runs), statistics.median(r["exact"] for r in runs))
              for *_, runs in results]
    front = set(pareto(points))
    label_points = [(statistics.median(r["labels"] for r in runs), y) for (*_, runs), (_, y) in zip(results, points,
                                                                                                  strict=True)]
    shown = ["public", "tracked", "shadow", f"ML, {args.repeats} sends", "inversion"]
    table = []
    for i, (name, setting, cut, runs) in enumerate(results):
        col = {k: [r[k] for r in runs] for k in runs[0] if k not in ("read", "attack", "seconds")}
        seconds = sum(sum(r["seconds"].values()) for r in runs)
        reads = [fmt([r["read"][k] for r in runs]) if k in runs[0]["read"] else "" for k in shown]
        natural_loss = f"{fmt(col['natural_before'], False)} → {fmt(col['natural_after'], False)}"
        step = f"{statistics.median(col['step_s']) / baseline_s:.2f}×" if baseline_s else "-"
        strongest = f"**{fmt(col['strongest'])}** ({runs[0]['attack']})"
        table.append([name, setting, cut, len(runs), fmt(col["train"], False), fmt(col["exact"]),
                      fmt(col["held"], False), natural_loss, *reads, strongest,
                      fmt(col["secrets"]), fmt(col["labels"]), step, f"{seconds:.0f}", "yes" if i in front else ""])
    notes = f"""
{args.model}, cuts ({a}, {b}) unless the row says otherwise, `full` mode, {args.steps} steps of 8 of the kit's 16
facts at lr {args.lr}; {args.seeds} runs a row (median, range in brackets), each with its own data order and with the
client's LoRA start and noise secret (drawn from the operating system). h1 clipping bound {h1_bound:.1f} (the 90th
percentile of h1's token norms on the task, untrained), dL/dh2 clipping bound {g2_bound:.2e} (the median row norm at
step 0). Utility: loss and exact match on the 16 facts, loss on 16 facts it never saw (held out) and on 16 plain
sentences of common knowledge before and after training (`splitkit.core.data.natural`), each through the client's
parts with its defence on.

What the server reads: after training the client sends {args.sentences} private sentences {args.repeats} times (fresh
noise each time, as training sends each fact 12 times); tokens read back exactly. Every attacker knows the public
weights and the defence with its setting, none the client's seeds. *public*: the white-box search through the public
Bottom, at most {args.budget} candidates per position in the order of the inversion refitted through the defence,
stopping where the nearest is nearer than half the second;
*tracked*: the same through a Bottom the server fitted to what it saw (`splitkit.privacy.track` on step
{", ".join(str(i + 1) for i in range((args.steps - 1) % args.track_every, args.steps, args.track_every))} of
{args.steps}, {args.fit_steps} least-squares steps each read; at a = {cuts[0]} only: the cut-depth rows have the public
search alone, which read more than the tracker at a = 1 and 15 in an earlier run); *shadow* (NoPeek): through a
Bottom the server trained the same way on other facts;
*ML* (noise on h1): maximum-likelihood decoding with the public model's prior through the tracked Bottom
(`splitkit.privacy.ml_decode`, beam 4, 32 + 32 candidates a position and up to 256 where nothing explains h1; the
tracked Bottom's own residual counted as noise), of all {args.repeats} sends (one send against twelve: notebook
06a); *inversion*: the refitted linear
inversion alone. **strongest**: the attack with the highest
median on that row, and its secrets read whole. Each is a lower bound of what such a server reads, for the budgets
said. Labels: from the last step's dL/dh2 the server picks each row's answer among the task's 16
(`answer_match`). "Pareto": no other setting beats it on both the strongest read (lower) and exact match (higher).
Step time: the median step against the undefended run's in the same run. Seconds: the row's runs, training and
every attack, on this machine; the rows took {sum(sum(sum(r["seconds"].values()) for r in runs)
                                                   for *_, runs in results) / 60:.0f} minutes.
"""
    columns = ["defence", "setting", "a", "runs", "train loss", "exact match", "held-out loss",
               "natural text loss", *[f"read: {k}" for k in shown], "read: strongest", "secrets", "labels",
               "step time", "seconds", "Pareto"]
    write_table(args.name, "Privacy against utility: each defence against the strongest attacker that knows it",
                columns, table, notes, out=args.out)
    return points, label_points


def figure(results, points, label_points, path: Path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {}
    for (name, setting, _, _), (x, y), (labels, _) in zip(results, points, label_points, strict=True):
        first = name not in colours  # the legend names each defence once
        colour = colours.setdefault(name, f"C{len(colours)}")
        for ax, xv in zip(axes, (x, labels), strict=True):
            ax.scatter(xv, y, color=colour, label=name if first and ax is axes[0] else None, s=40)
            ax.annotate(setting, (xv, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, plane in zip(axes, (points, label_points), strict=True):
        xs = sorted(plane[i] for i in pareto(plane))
        ax.step([p[0] for p in xs], [p[1] for p in xs], where="post", color="black", lw=1, ls="--",
                label="Pareto front")
    axes[0].set(xlabel="tokens the strongest attacker reads back", ylabel="exact match on the task",
                title="The input: utility against what the server reads")
    axes[1].set(xlabel="rows whose answer the server reads from dL/dh2", ylabel="exact match on the task",
                title="The labels: utility against what the server reads")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
