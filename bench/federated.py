"""Notebook 09's split federation, out of sample: each way of training tuned on some seeds, reported on others.

The study of notebook 09 (splitkit.federated.study: 4 students with 2 facts each that no other student has, 6
rounds of 2 local steps) for six arms: FedAvg of A and B; FedAvg with A frozen (FFA-LoRA); the mean of the
products B·A by SVD; FedAvg with each student's AdamW kept across rounds (a control for drift made by the
optimizer's restarts); each student alone; one client with all the facts. Then Flower's FedAvgM (a server learning
rate along the mean update) at FedAvg's rate.

1. Tuning, on --tune-seeds: each arm at every rate of its grid; its rate is the one whose worst seed ends with
   the lowest loss (alone: on the student's own facts; the others: on all 8). Where that rate is the grid's end,
   the grid grows by a factor of 2 past it (at most twice), so the chosen rate lies inside. Then FedAvgM's server
   rate, by the same rule, on its own grid.
2. Reporting, on --report-seeds (disjoint): every arm at its chosen rate: the task (loss, facts exact), the
   natural text (forgetting), client drift; and what the FedAvg arm leaks (splitkit.federated.leaks).

    python bench/federated.py                  # SmolLM2, cuts (10, 20): tune on 0 1 2, report on 3 4 5

federated.md holds the tables, federated.json the chosen rates and every reported number notebook 09 reads.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import RESULTS, write_table
from splitkit import load_model
from splitkit.core.data import COLOURS, natural, rephrase
from splitkit.core.lora import LoraSpec
from splitkit.core.models import SMOLLM2
from splitkit.federated.cohort import Cohort
from splitkit.federated.leaks import gradient_match, revealed
from splitkit.federated.study import (
    ARMS,
    FEDAVGM,
    LOCAL_STEPS,
    ROUNDS,
    Arm,
    cohort_for,
    make_arm,
    outcome,
    own_shards,
    run_rounds,
    study_facts,
)

GRIDS = {"FedAvg": [2.5e-3, 5e-3, 1e-2, 2e-2], "FedAvg, A frozen": [1e-2, 2e-2, 4e-2, 8e-2],
         "FedAvg, the product": [2.5e-3, 5e-3, 1e-2, 2e-2], "FedAvg, Adam kept": [1.25e-3, 2.5e-3, 5e-3, 1e-2],
         "alone": [2.5e-3, 5e-3, 1e-2, 2e-2], "all the data": [6.25e-4, 1.25e-3, 2.5e-3, 5e-3]}
SERVER_LRS = [1.0, 2.0, 4.0, 8.0]  # FedAvgM's rate; 1 is FedAvg itself
SAME_RATE = "FedAvg, Adam kept, FedAvg's rate"  # reported only: the drift control at FedAvg's rate


def run(model, tokenizer, cuts, seed: int, arms: list) -> tuple:
    pairs = study_facts(seed)
    arms = [a(pairs) for a in arms]
    cohort = cohort_for(model, cuts, LoraSpec(seed=seed), arms)
    return pairs, cohort, run_rounds(cohort, tokenizer, pairs, arms, ROUNDS, LOCAL_STEPS)


def tune(model, tokenizer, cuts, seeds, grids: dict, server_lrs: list, got: dict) -> tuple[dict, dict]:
    """{arm: chosen rate}, {(arm, rate): [(loss, exact) per seed]}: first every arm's client rate, then FedAvgM's
    server rate at FedAvg's chosen client rate (its 1 is FedAvg, measured already). `got` holds runs already made."""

    def client(todo):
        return [lambda p, n=n, lr=lr: make_arm(n, lr, p) for n, lrs in todo.items() for lr in lrs]

    chosen = grow(model, tokenizer, cuts, seeds, grids, got, client)
    if (FEDAVGM, 1.0) in got and got[(FEDAVGM, 1.0)] != got[("FedAvg", chosen["FedAvg"])]:
        raise SystemExit("--reuse: FedAvgM's runs were at another FedAvg rate; retune FedAvgM")
    got[(FEDAVGM, 1.0)] = got[("FedAvg", chosen["FedAvg"])]

    def server(todo):
        return [lambda p, s=s: make_arm(FEDAVGM, chosen["FedAvg"], p, s) for s in todo.get(FEDAVGM, []) if s != 1.0]

    chosen |= grow(model, tokenizer, cuts, seeds, {FEDAVGM: server_lrs}, got, server)
    return chosen, got


def grow(model, tokenizer, cuts, seeds, grids: dict, got: dict, arms_for) -> dict:
    """Each arm of `grids` at each of its rates on every seed, into got[(arm, rate)]; where an arm's best rate (the
    lowest loss of its worst seed) is an end of its grid, the grid grows past it by a factor of 2, at most twice.
    Returns {arm: its best rate}."""
    def best(name):
        return min((r for n, r in got if n == name), key=lambda r: max(x for x, _ in got[(name, r)]))

    todo = {name: [r for r in rates if (name, r) not in got] for name, rates in grids.items()}
    for growth in range(3):
        for seed in seeds:
            wanted = arms_for(todo)
            if wanted:
                pairs, _, results = run(model, tokenizer, cuts, seed, wanted)
                for name, result in results.items():
                    n, rate = name.split(" @ ")
                    got.setdefault((n, float(rate)), []).append(outcome(result, pairs))
        todo = {}
        for name in grids:
            rates = sorted(r for n, r in got if n == name)
            if best(name) == rates[0]:
                todo[name] = [rates[0] / 2]
            elif best(name) == rates[-1]:
                todo[name] = [rates[-1] * 2]
        print(f"tuned {sorted(grids)}" + (f"; growing {todo}" if todo and growth < 2 else ""), flush=True)
        if not todo or growth == 2:
            break
    return {name: best(name) for name in grids}


def report(model, tokenizer, cuts, seed: int, chosen: dict) -> dict:
    """Every arm at its chosen rate on one held-out seed: scores, natural text, drift; FedAvg's leaks."""
    wanted = [lambda p, n=n: make_arm(n, chosen[n], p) for n in chosen if n != FEDAVGM]
    wanted.append(lambda p: make_arm(FEDAVGM, chosen["FedAvg"], p, chosen[FEDAVGM]))
    wanted.append(lambda p: Arm(f"{SAME_RATE} @ {chosen['FedAvg']:g}", own_shards(p), lr=chosen["FedAvg"],
                                keep_adam=True))  # the drift control at FedAvg's own rate
    pairs, cohort, results = run(model, tokenizer, cuts, seed, wanted)
    start = next(iter(next(iter(results.values())).starts[0].values()))  # every arm's LoRA before round 1
    slot = cohort.names[0]
    cohort.load(slot, start)
    text, asked = natural(16), rephrase(pairs)  # asked: every fact in each phrasing never trained on
    before = cohort.score(tokenizer, pairs + asked + text, [slot])[slot]
    n_facts, n_asked = len(pairs), len(pairs) + len(asked)
    out = {"start": {"loss": statistics.mean(before["loss"][:n_facts]), "exact": sum(before["exact"][:n_facts]),
                     "rephrased": sum(before["exact"][n_facts:n_asked]),
                     "natural": statistics.mean(before["loss"][n_asked:])}, "arms": {}}
    for name, result in results.items():
        n = name.split(" @ ")[0]
        models = result.averages[-1:] or list(result.clients[ROUNDS].values())
        for i, state in enumerate(models):
            cohort.load(cohort.names[i], state)
        got = list(cohort.score(tokenizer, asked + text, cohort.names[:len(models)]).values())
        # asked[j] is fact j % 8: the federated model is asked every fact, a student alone its own
        own = [[p in shard for p in pairs] for shard in result.arm.shards.values()] if len(models) > 1 \
            else [[True] * n_facts]
        curve = [outcome(result, pairs, r) for r in range(ROUNDS)]
        loss, exact = outcome(result, pairs)
        out["arms"][n] = {"lr": result.arm.lr, "server_lr": result.arm.server_lr, "loss": loss, "exact": exact,
                          "curve": curve, "drift": result.drift, "gap": result.gap,
                          "rephrased": sum(x for s, mine in zip(got, own, strict=True)
                                           for j, x in enumerate(s["exact"][:len(asked)]) if mine[j % n_facts]),
                          "natural": statistics.mean(statistics.mean(s["loss"][len(asked):]) for s in got)}
    at_start = {key: values[:len(pairs)] for key, values in before.items()}  # the start's scores on the facts
    out["leaks"] = leaks(cohort, tokenizer, pairs, results[f"FedAvg @ {chosen['FedAvg']:g}"], start, at_start)
    return out


def leaks(cohort: Cohort, tokenizer, pairs: list, fed, start: dict, at_start: dict) -> dict:
    """What the FedAvg arm's aggregator and classmates read, per student (`at_start`: the start's scores)."""
    held = fed.arm.shards
    slots = dict(zip(held, cohort.names, strict=False))  # one adapter per student
    scores = {}  # round -> {student: its LoRA's scores}
    for r in range(1, ROUNDS + 1):
        for k in held:
            cohort.load(slots[k], fed.clients[r][k])
        got = cohort.score(tokenizer, pairs, list(slots.values()))
        scores[r] = {k: got[slots[k]] for k in held}
    sent = [at_start]  # round 1 starts from `start`
    sent += [s["average"] for s in fed.scores[:-1]]  # round r starts from round r − 1's average
    out = {"revealed": {r: revealed(scores[r], sent[r - 1], pairs, held) for r in range(1, ROUNDS + 1)}}
    out["revealed_any"] = {k: sum(any(scores[r][k]["exact"][i] and not sent[r - 1]["exact"][i]
                                      for r in range(1, ROUNDS + 1))
                                  for i, p in enumerate(pairs) if p in held[k]) for k in held}
    last = fed.scores[-1]["average"]["exact"]
    out["classmates"] = {k: sum(x for i, x in enumerate(last) if pairs[i] not in held[k]) for k in held}
    matched = gradient_match(cohort, tokenizer, [p for p, _ in pairs], start, fed.clients[1], held)
    out["matched"] = {k: {"facts": m["facts"], "answers": m["answers"], "of": m["of"]} for k, m in matched.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--tune-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--report-seeds", nargs="+", type=int, default=[3, 4, 5])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--reuse", default=None, metavar="JSON",
                   help="take the tuning runs of a federated.json of the same tuning seeds, except --retune's arms")
    p.add_argument("--retune", nargs="*", default=[], choices=[*ARMS, FEDAVGM])
    p.add_argument("--out", default=None, help="folder for federated.md and federated.json (default: bench/results)")
    args = p.parse_args(argv)
    if set(args.tune_seeds) & set(args.report_seeds):
        p.error("the tuning and the reporting seeds must be disjoint")
    if "FedAvg" not in args.arms:
        p.error("--arms must include FedAvg: FedAvgM runs at its rate, and its leaks are measured")

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    cuts = tuple(args.cuts)
    got = reused(args) if args.reuse else {}
    chosen, got = tune(model, tokenizer, cuts, args.tune_seeds, {n: GRIDS[n] for n in args.arms}, SERVER_LRS, got)
    reported = {seed: report(model, tokenizer, cuts, seed, chosen) for seed in args.report_seeds}
    minutes = (time.perf_counter() - t0) / 60
    out = Path(args.out) if args.out else RESULTS
    write(out, args, chosen, got, reported, minutes)


def reused(args) -> dict:
    """{(arm, rate): [(loss, exact) per seed]} of --reuse's tuning, for the arms not retuned (FedAvgM only if FedAvg
    is not: its runs are at FedAvg's rate)."""
    old = json.loads(Path(args.reuse).read_text())
    if old["tune_seeds"] != args.tune_seeds:
        raise SystemExit(f"--reuse tuned on seeds {old['tune_seeds']}, not {args.tune_seeds}")
    keep = [n for n in args.arms if n not in args.retune]
    if FEDAVGM not in args.retune and "FedAvg" in keep:
        keep.append(FEDAVGM)
    return {(n, float(rate)): [tuple(x) for x in runs] for n in keep for rate, runs in old["tuning"][n].items()}


def spread(values, fmt="{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def write(out: Path, args, chosen: dict, got: dict, reported: dict, minutes: float):
    seeds = list(reported)
    rows = []
    for n in [*args.arms, FEDAVGM, SAME_RATE]:
        a = [reported[s]["arms"][n] for s in seeds]
        lr = {FEDAVGM: f"{chosen['FedAvg']:g}, server {chosen[FEDAVGM]:g}",
              SAME_RATE: f"{chosen['FedAvg']:g}"}.get(n) or f"{chosen[n]:g}"
        drift = [statistics.mean(x["drift"]) for x in a if x["drift"]]
        rows.append([n, lr, spread([x["loss"] for x in a]), spread([x["exact"] for x in a], "{:g}"),
                     spread([x["rephrased"] for x in a], "{:g}"), spread([x["natural"] for x in a]),
                     spread(drift) if drift else "–"])
    start = [reported[s]["start"] for s in seeds]
    grid = ["| arm | rate | worst-seed loss | loss, median | exact of 8, median (range) |  |",
            "|---|---|---|---|---|---|"]
    for n, lr in sorted(got, key=lambda k: (list(ARMS).index(k[0]) if k[0] in ARMS else 99, k[1])):
        losses, exact = zip(*got[(n, lr)], strict=True)
        ends = (min(r for m, r in got if m == n), max(r for m, r in got if m == n))
        mark = ("**chosen**" + (", an end of the grid" if lr in ends else "")) if chosen[n] == lr else ""
        grid.append(f"| {n} | {lr:g} | {max(losses):.3f} | {statistics.median(losses):.3f} | "
                    f"{statistics.median(exact):g} ({min(exact)}–{max(exact)}) | {mark} |")
    leak = ["| seed | revealed in round 1 | in round 6 | in any round | gradient matching, round 1: facts (answers) "
            "| others' facts the last average answers |", "|---|---|---|---|---|---|"]
    for s in seeds:
        L = reported[s]["leaks"]
        m = L["matched"]
        leak.append(f"| {s} | {sum(L['revealed'][1].values())} / 8 | {sum(L['revealed'][ROUNDS].values())} / 8 | "
                    f"{sum(L['revealed_any'].values())} / 8 | {sum(x['facts'] for x in m.values())} / 8 "
                    f"({sum(x['answers'] for x in m.values())}) | "
                    f"{', '.join(str(v) for v in L['classmates'].values())} of 6 |")
    tuned, held = ", ".join(map(str, args.tune_seeds)), ", ".join(map(str, seeds))
    but = f" of every arm but {', '.join(args.retune)}" if args.retune else ""
    reuse = (f" The tuning runs{but} are those of an earlier run of this script on the same seeds and code"
             f" (`--reuse`)." if args.reuse else "")
    notes = f"""
Reported on seeds {held}, every arm at the rate chosen on seeds {tuned}: median (range) over the seeds.
{args.model}, cuts {tuple(args.cuts)}, LoRA r 8 on q_proj and v_proj of the client's blocks (the Trunk frozen, as
in `full`). 4 students, 2 facts each that no other student has; 6 rounds of 2 local
steps on a student's whole shard, AdamW fresh every round, as a Flower client gets it (kept in "Adam kept", and by
the clients on their own, alone and all the data, which have no rounds to restart at); "all the data": one client
with all 8 facts, as many steps. "{SAME_RATE}": the drift control at FedAvg's rate, not tuned.{reuse}
Loss: cross-entropy of the answer tokens, nats per token, after the last round, on all 8
facts (alone: each student on its own 2, averaged); exact: facts whose every answer token is the model's argmax
(alone: students' own). Rephrased: the same 8 facts asked in two phrasings never trained on
(`splitkit.core.data.REPHRASED`), exact as above, 16 questions (alone: each student its own 4);
{spread([x['rephrased'] for x in start], '{:g}')} at the start; the tuning rule does not see them. Natural text:
the loss on 16 plain sentences, {spread([x['natural'] for x in start])} at the start. Drift: the spread of the
students' moves of B·A over their mean's norm, mean over rounds (√3 ≈ 1.73: unrelated moves of equal size).
The start: loss {spread([x['loss'] for x in start])}, exact {spread([x['exact'] for x in start], '{:g}')}.
FedAvgM: Flower's strategy, server momentum 0, at FedAvg's client rate. The whole run took {minutes:.0f} min.

#### Tuning (seeds {tuned}): each arm's grid, the chosen rate inside it

The rule: the lowest loss of the worst seed. FedAvgM's rate is the server's (1 is FedAvg).

{chr(10).join(grid)}

#### What the FedAvg arm leaks (seeds {held}), summed over its 4 students

Revealed: a student's own facts its LoRA answers exactly and the average it started that round from did not (what
the aggregator learns by asking the {len(COLOURS)} colours' questions under it). Gradient matching: the aggregator
computes each (question, colour)'s gradient at the LoRA it sent and picks the pairs whose signs the student's
round-1 update follows (`splitkit.federated.leaks.gradient_match`); a blind guess of 2 pairs per student names
1/8 of a fact in all, on average.
Classmates: facts of the other students that the last average, which every student receives, answers.

{chr(10).join(leak)}
"""
    write_table("federated", "Split federation, out of sample: each arm at its tuned rate on held-out seeds",
                ["arm", "rate", "loss", "exact of 8", "rephrased, exact of 16", "natural text loss", "drift"], rows,
                notes, out=out)
    (out / "federated.json").write_text(json.dumps(
        {"chosen": chosen, "rule": "the lowest loss of the worst tuning seed", "tune_seeds": args.tune_seeds,
         "report_seeds": seeds, "grids": {n: sorted(lr for m, lr in got if m == n) for n in chosen},
         "tuning": {n: {f"{lr:g}": got[(n, lr)] for m, lr in sorted(got) if m == n} for n in chosen},
         "reported": {str(s): r for s, r in reported.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
