"""What the server sees: how much of the input it reads back from h1, and what dL/dh2 tells it about the labels.

Two attacks on h1 (the nearest token embedding, and a linear inversion fitted on made-up tokens, as in
He et al., "Model inversion attacks against collaborative inference", 2019), the per-position size of
dL/dh2, a label probe for a server that knows the Top (label leakage, as in Li et al., "Label leakage and
protection in two-party split learning", 2022), and two servers that look: one keeps a copy of all it
receives, the other also answers with a dL/dh1 of its own.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.split import Blocks, Bottom
from ..training.defences import Guard
from ..trunk.server import TrunkServer
from ..wire import codec as wire
from ..wire import protocol as P

# Private sentences of the kind a client would not want to share: names, numbers, places.
SENTENCES = [
    "My password is hunter2 and my bank is in Zurich, account 4417.",
    "Dr. Amelia Okafor will see you on Tuesday at 3:15 pm in room 212.",
    "Please wire 2,500 euros to Lukas Brenner before Friday.",
    "The patient, born 14 March 1987, is allergic to penicillin.",
    "Our new office opens at 48 Harbour Street, Cape Town, in June.",
    "Call me at 555-0193 after nine, not before.",
    "Maria Gonzalez was diagnosed with type 2 diabetes last spring.",
    "The launch code for the Berlin server is 7731-alpha.",
    "I owe my landlord in Lisbon three months of rent.",
    "Flight BA 287 leaves Heathrow for San Francisco at 11:40.",
    "Send the contract to j.tanaka@example.com by noon on Monday.",
    "Grandpa Henrik keeps 40 gold coins under the stairs in Oslo.",
    "The quarterly loss was 3.2 million dollars, not the 1.1 we reported.",
    "Priya Raman lives at 9 Elm Court, Apartment 6B, Toronto.",
    "My therapist in Melbourne says the panic attacks started in 2019.",
    "The vault in Geneva opens with the combination 18-42-7.",
    "Kofi Mensah signed the lease for the flat in Accra yesterday.",
    "Her salary rose from 61,000 to 74,500 pounds this year.",
    "We are moving the factory from Ohio to Monterrey next winter.",
    "The PIN for the card ending in 8812 is 0457.",
    "Sofia Rossi failed her driving test in Milan twice.",
    "Tomorrow at 6 am the police will search 17 Quay Road, Dublin.",
    "The board voted 5 to 2 to sell the Nairobi branch.",
    "Ahmed Karimi paid 900 dollars in cash for the laptop in Dubai.",
]


# What a client would least want read back from each sentence above, in the same order.
SECRETS = ["hunter2", "Amelia Okafor", "Lukas Brenner", "14 March 1987", "48 Harbour Street", "555-0193",
           "Maria Gonzalez", "7731-alpha", "Lisbon", "BA 287", "j.tanaka@example.com", "Henrik", "3.2 million",
           "Priya Raman", "Melbourne", "18-42-7", "Kofi Mensah", "74,500", "Monterrey", "0457", "Sofia Rossi",
           "17 Quay Road", "Nairobi", "Ahmed Karimi"]


def encode_sentences(tokenizer, sentences) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (S, T) and a mask (S, T) of the real tokens."""
    rows = [tokenizer(s, add_special_tokens=False).input_ids for s in sentences]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # padding: causal attention never lets it reach a real token
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None]


@torch.no_grad()
def hidden_by_cut(model, input_ids, cuts) -> dict:  # (B, T) -> {a: (B, T, d)}
    """{a: h1 = Bottom(input_ids) for the first cut a}, in one pass through the deepest Bottom."""
    out, h, done = {}, Bottom(model, 0)(input_ids), 0  # (B, T, d): the embeddings
    for a in sorted(cuts):
        h = Blocks(model, done, a)(h)  # blocks [done, a)
        out[a], done = h, a
    return out


@torch.no_grad()
def nearest_tokens(model, h1):  # (..., d) -> (...) token ids
    """For each position, the token whose input embedding is most similar to h1 (cosine)."""
    table = F.normalize(model.get_input_embeddings().weight, dim=-1)  # (vocab, d)
    return (F.normalize(h1, dim=-1) @ table.T).argmax(-1)


@torch.no_grad()
def fit_inversions(model, cuts, n_tokens: int = 8192, seq_len: int = 64, seed: int = 0, defence=None) -> dict:
    """{a: W (d, d)}, the least-squares linear map with h1 @ W ~ embedding(token) at each cut, fitted on
    random token sequences the attacker makes up (no access to the client's data). With a `defence`
    (splitkit.training.defences.Defence) the attacker is adaptive: it fits on h1 that went through that defence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n_tokens // seq_len, seq_len), generator=g)  # (N, T)
    target = model.get_input_embeddings()(ids).flatten(0, 1)  # (N*T, d)
    hidden = hidden_by_cut(model, ids, cuts)
    if defence is not None:
        guard = Guard(replace(defence, seed=None if defence.seed is None else defence.seed + 1))  # its own noise
        hidden = {a: guard.h1(h1) for a, h1 in hidden.items()}
    # float64: at deep cuts h1 has a few huge dimensions, and a float32 solve is not reproducible
    return {a: torch.linalg.lstsq(h1.flatten(0, 1).double(), target.double()).solution.float()
            for a, h1 in hidden.items()}


@torch.no_grad()
def recovered_tokens(model, input_ids, cuts, inversions: dict | None = None, mask=None) -> dict:  # {a: (S, T)}
    """{a: the token ids the server reads back from h1}: the nearest embedding of h1, or of h1 @ W with
    `inversions` (from fit_inversions). Positions outside `mask` are not read (-1)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask
    out = {}
    for a, h1 in hidden_by_cut(model, input_ids, cuts).items():
        h = h1 if inversions is None else h1 @ inversions[a]  # (S, T, d)
        out[a] = torch.full_like(input_ids, -1)
        out[a][mask] = nearest_tokens(model, h[mask])  # (n, d) -> (n,): only the real tokens
    return out


def recovery(recovered: dict, input_ids, mask) -> dict:  # {a: (S, T)} -> {a: (S,)}
    """{a: fraction of each sentence's tokens recovered exactly}."""
    return {a: ((ids == input_ids) & mask).sum(1) / mask.sum(1) for a, ids in recovered.items()}


def decode(tokenizer, ids, mask=None) -> str:
    """The text of one row of token ids (only the real tokens, when a mask is given)."""
    return tokenizer.decode(ids if mask is None else ids[mask])


def gradient_reach(g) -> torch.Tensor:  # (B, T, d) -> (B, T)
    """Per position, the norm of a gradient such as dL/dh2."""
    return g.norm(dim=-1)


# ---------------------------------------------------------------------------- the label probe


def top_logits(top, h, positions):  # (B, t, d) -> (B, len(positions), vocab)
    """The Top's logits at some positions only (the LM head is the costly part)."""
    u = top.norm(top.blocks(h))[:, positions]  # (B, P, d)
    logits = top.lm_head(u)
    return logits if top.softcap is None else torch.tanh(logits / top.softcap) * top.softcap


@torch.no_grad()
def label_probe(top, h2, g2, probes: int = 8, verify: int = 4, tol: float = 1e-3, seed: int = 0):
    """Guess the labels (B, T), -100 where none, from dL/dh2 (g2) and h2, for a server that knows the Top
    (step 0 of a public model with a fresh LoRA). Each row is read from its end: a position whose dL/dh2 the
    labels found so far explain has no loss term; at one that has, `_label_at` finds the token."""
    B, T, d = h2.shape
    guess = torch.full((B, T), -100, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for b in range(B):
        nonzero = (gradient_reach(g2[b]) > 0).nonzero()
        explained = torch.zeros(T, d)  # (T, d): what the labels found so far put into this row's dL/dh2
        for s in range(int(nonzero.max()) if len(nonzero) else -1, -1, -1):
            r = g2[b, s] - explained[s]  # (d,): what a loss term at s, if any, put there
            if r.norm() <= tol * g2[b, s].norm():
                continue  # explained already: the logits at s predict no label
            y, part = _label_at(top, h2[b:b + 1, :s + 1], r, probes, verify, g)
            guess[b, s + 1] = y  # the logits at s predict the token at s + 1
            explained[:s + 1] += part
    return guess


def _label_at(top, h, r, probes: int, verify: int, g):  # (1, t, d), (d,) -> (y, (t, d))
    """The label y at the last position s, and its loss term's dL/dh (t, d), which at s is r.
    That term is J^T (p - onehot(y)) / N (J = dlogits_s/dh, p = softmax). At s, J^T onehot(y) is a multiple
    of M^T W_y (M = du_s/dh_s, u the normed hidden state, W the LM head) and lies in the plane of r and
    J^T p. So W_y is orthogonal to M e for each e orthogonal to that plane: a few Jacobian-vector products
    M e score the whole vocabulary at once, and the best few candidates are checked exactly."""
    s = h.shape[1] - 1
    x = h.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = top_logits(top, x, [s])[0, 0]  # (vocab,)
    p = logits.softmax(-1)  # the Top's own prediction at s

    def pull(cot):  # (vocab,) -> (t, d): J^T cot
        with torch.enable_grad():
            return torch.autograd.grad(logits, x, cot, retain_graph=True)[0][0]

    Jp = pull(p)  # (t, d)
    plane = torch.linalg.qr(torch.stack([Jp[s], r], 1)).Q.T  # (2, d)
    e = torch.randn(probes, h.shape[-1], generator=g)
    e -= (e @ plane.T) @ plane  # (probes, d): orthogonal to the plane

    def normed(xs):  # (probes, d) -> (probes, d): u_s with h_s = xs, the positions before s fixed
        return top.norm(top.blocks(torch.cat([h[:, :s].expand(len(xs), -1, -1), xs[:, None]], 1)))[:, s]

    with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD needs attention written in plain ops
        _, Me = torch.func.jvp(normed, (h[0, s].expand(probes, -1).clone(),), (e,))  # (probes, d)
    W = top.lm_head.weight  # (vocab, d)
    score = (W @ Me.T).norm(dim=-1) / W.norm(dim=-1)  # (vocab,): 0 for the label, up to rounding
    candidates = score.topk(verify, largest=False).indices  # (verify,)
    v = torch.stack([Jp - pull(F.one_hot(c, p.shape[0]).to(p.dtype)) for c in candidates])  # (verify, t, d)
    scale = (v[:, s] @ r) / (v[:, s] * v[:, s]).sum(-1)  # (verify,): each candidate's best 1/N
    best = int((r - scale[:, None] * v[:, s]).norm(dim=-1).argmin())
    return int(candidates[best]), scale[best] * v[best]


# ---------------------------------------------------------------------------- servers that look


class CuriousServer(TrunkServer):
    """An honest trunk server that keeps a copy of every tensor it receives (h1 and dL/dh2) and of every dL/dh1 it
    answers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []  # [(op, [tensors])], oldest first
        self.sent_back = []  # [dL/dh1], one per backward answered, oldest first

    def _forward(self, session, header, tensors):
        self.seen.append((header["op"], [t.clone() for t in tensors]))
        return super()._forward(session, header, tensors)

    def _backward(self, session, header, tensors):
        self.seen.append((header["op"], [t.clone() for t in tensors]))
        reply = super()._backward(session, header, tensors)
        _, (g1,) = wire.decode(reply)  # (B, T, d)
        self.sent_back.append(g1)
        return reply


class SteeringServer(CuriousServer):
    """A malicious trunk server: it answers each backward with forge(dL/dh1) instead of dL/dh1."""

    def __init__(self, *args, forge=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.forge = forge  # (B, T, d) -> (B, T, d); None: honest

    def _backward(self, session, header, tensors):
        reply = super()._backward(session, header, tensors)
        if self.forge is None:
            return reply
        _, (g1,) = wire.decode(reply)  # (B, T, d): the honest dL/dh1
        self.sent_back[-1] = self.forge(g1)
        return wire.encode(P.ok(header), [self.sent_back[-1]], dtype=tensors[0].dtype)
