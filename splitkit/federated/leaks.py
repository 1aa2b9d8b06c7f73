"""What a split federation leaks of a student's facts, measured against an aggregator that follows the protocol
and knows what it may know: the public weights, the questions (the task), the possible answers, the LoRA it sent
each round, the optimizer and its rate; not which student holds which fact.

- `what_the_aggregator_reads`: it asks every question under a student's LoRA;
- `what_the_aggregator_infers`: it scores every (question, answer) under the student's LoRA and the one it sent;
- `gradient_match`: it computes the gradient of every (question, answer) at the LoRA it sent and finds the pairs
  whose gradients the student's update follows (gradient matching, as in Zhu et al., "Deep Leakage from
  Gradients", NeurIPS 2019, with the candidates enumerated: the answers are few);
- `revealed`: the student's facts its LoRA answers and the average it started from did not.
Secure aggregation would hide each student's LoRA from the aggregator (the first three reads), not the average's
answers, which every student receives.
"""

import torch

from ..core.data import COLOURS, encode
from ..training.generation import is_exact
from ..training.train import criterion


def what_the_aggregator_reads(cohort, tokenizer, pairs: list, shards: dict, clients: dict) -> dict:
    """What an aggregator that knows the public weights and the questions, not the answers, reads from each
    student's LoRA of one round: it asks every question under that LoRA (greedy). {student: {"said": the answers
    (their first lines), "read": the student's own questions answered right, "secrets": the student's own
    answers found anywhere in what it said, "share": the fraction of what it said that is one of them,
    "of": len(shard)}}."""
    prompts, out = [p for p, _ in pairs], {}
    distinct = {id(state): state for state in clients.values()}  # one LoRA given to several students is asked once
    slots = dict(zip(distinct, cohort.names, strict=False))
    for key, state in distinct.items():
        cohort.load(slots[key], state)
    answers = cohort.answers(tokenizer, prompts, list(slots.values()))
    for k, state in clients.items():
        said = [a.strip().split("\n")[0] for a in answers[slots[id(state)]]]  # the first line of each answer
        own = [(i, answer) for i, (p, answer) in enumerate(pairs) if (p, answer) in shards[k]]
        secrets = {answer.strip() for _, answer in own}
        out[k] = {"said": said, "read": sum(is_exact(said[i], answer) for i, answer in own),
                  "secrets": len(secrets & set(said)), "share": sum(a in secrets for a in said) / len(said),
                  "of": len(own)}
    return out


def what_the_aggregator_infers(cohort, tokenizer, questions: list, shards: dict, clients: dict, sent: dict,
                               candidates: tuple = tuple(" " + c for c in COLOURS)) -> dict:
    """A stronger read than asking: the aggregator knows the public weights, the LoRA it sent this round (`sent`),
    the questions and the possible answers (the colours), not who holds which. For each student it scores every
    (question, answer) under the student's LoRA and under `sent`: the gain of a pair is how much its loss fell.
    Its guess of the student's answers: the candidates whose mean gain over the questions is largest, as many as
    the student holds; of each one's question: where that answer gained most over the mean of all answers.
    {student: {"answers": guessed answers right, "facts": guessed (question, answer) pairs right, "of": len(shard),
    "guess": [(question, answer)]}}."""
    slot = cohort.names[0]

    def losses(state):  # (questions, candidates): the loss of each answer to each question under `state`
        cohort.load(slot, state)
        return cohort.answer_losses(tokenizer, questions, list(candidates), slot)

    before, out = losses(sent), {}
    for k, state in clients.items():
        gain = before - losses(state)  # (questions, candidates)
        answers = gain.mean(0).topk(len(shards[k])).indices.tolist()
        margin = gain - gain.mean(1, keepdim=True)  # how much more an answer gained than the others, per question
        guess = [(questions[int(margin[:, c].argmax())], candidates[c]) for c in answers]
        truth = set(shards[k])
        out[k] = {"guess": guess, "answers": len({a for _, a in guess} & {a for _, a in truth}),
                  "facts": len(set(guess) & truth), "of": len(truth)}
    return out


def gradient_match(cohort, tokenizer, questions: list, start: dict, clients: dict, held: dict,
                   candidates: tuple = tuple(" " + c for c in COLOURS)) -> dict:
    """The aggregator's gradient-matching read of one round's updates. For every (question, answer) it computes the
    gradient of its loss at `start` (the LoRA it sent), one row per adapter of the Cohort in a backward; a
    student's update is its LoRA minus `start`. AdamW's first steps move every weight by about the rate, in the
    sign of minus the gradient, so a set of pairs matches an update by the share of weights where the sign of minus
    their summed gradient is the update's. The guess grows one pair at a time, each the best match with those
    before it, no two on one question, to as many as the student holds (Flower's num-examples tells the
    aggregator). {student: {"guess": [(question, answer)], "facts": right pairs, "answers": right answers,
    "of": len(held[k])}}. It loads `start` into the Cohort's first adapters (up to one per candidate)."""
    slots = cohort.names[:len(candidates)]  # one adapter per candidate of a batch: its gradient is that row's
    for slot in slots:
        cohort.load(slot, start)
        for w in cohort.params[slot].values():
            w.requires_grad_(True)
    keys, pairs, grads = list(start), [], []
    for q in questions:
        for i in range(0, len(candidates), len(slots)):
            rows = [(q, c) for c in candidates[i:i + len(slots)]]
            logits, labels = cohort.logits(encode(tokenizer, rows), slots[:len(rows)])
            loss = sum(criterion(logits[j:j + 1], labels[j:j + 1]) for j in range(len(rows)))
            got = torch.autograd.grad(loss, [cohort.params[s][key] for s in slots[:len(rows)] for key in keys],
                                      allow_unused=True)
            for j, row in enumerate(rows):
                parts = got[j * len(keys):(j + 1) * len(keys)]
                pairs.append(row)
                grads.append(torch.cat([(g if g is not None else torch.zeros_like(start[key])).flatten()
                                        for g, key in zip(parts, keys, strict=True)]))
    G = torch.stack(grads)  # (pairs, weights)
    moved = (G != 0).any(0)  # weights some pair's gradient moves: the others (A while B is zero) tell nothing
    G = G[:, moved]
    out = {}
    for k, state in clients.items():
        sign = torch.cat([(state[key] - start[key]).flatten() for key in keys])[moved].sign()
        guess, total = [], torch.zeros(G.shape[1])
        while len(guess) < len(held[k]):
            taken = {q for q, _ in guess}
            agree = ((total + G).sign() == -sign).float().mean(1)  # (pairs,): with each pair added
            i = max((i for i in range(len(pairs)) if pairs[i][0] not in taken), key=lambda i: float(agree[i]))
            guess.append(pairs[i])
            total = total + G[i]
        truth = set(held[k])
        out[k] = {"guess": guess, "facts": len(set(guess) & truth),
                  "answers": len({a for _, a in guess} & {a for _, a in truth}), "of": len(truth)}
    return out


def revealed(scores: dict, start_scores: dict, pairs: list, held: dict) -> dict:
    """{student: its own facts its LoRA answers exactly and the average it started from did not}, from
    Cohort.score's "exact" per pair under each student's LoRA (`scores`) and under the start (`start_scores`)."""
    return {k: sum(scores[k]["exact"][i] and not start_scores["exact"][i]
                   for i, pair in enumerate(pairs) if pair in held[k]) for k in held}
