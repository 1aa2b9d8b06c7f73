"""What the server sees: how much of the input it can read back from h1, and what dL/dh1 tells it.

The attack here is the simplest one: match each position of h1 against the token embedding
table (cosine similarity) and take the nearest token. At a = 0, h1 *is* the embedding.
"""

import torch
import torch.nn.functional as F

from .split import split_model


@torch.no_grad()
def nearest_tokens(model, h1):  # (B, T, d) -> (B, T) token ids
    """For each position, the token whose input embedding is most similar to h1 (cosine)."""
    table = F.normalize(model.get_input_embeddings().weight, dim=-1)  # (vocab, d)
    return (F.normalize(h1, dim=-1) @ table.T).argmax(-1)


@torch.no_grad()
def recovery_by_cut(model, input_ids, cuts) -> dict:
    """{a: fraction of input tokens that nearest_tokens recovers from h1 = Bottom(input_ids)}."""
    out = {}
    for a in cuts:
        h1 = split_model(model, (a, model.config.num_hidden_layers)).bottom(input_ids)  # (B, T, d)
        out[a] = float((nearest_tokens(model, h1) == input_ids).float().mean())
    return out


def gradient_reach(g1) -> torch.Tensor:  # (B, T, d) -> (B, T)
    """Per position, the norm of dL/dh1 the server sends back: zero after the last labelled token."""
    return g1.norm(dim=-1)


@torch.no_grad()
def fit_inversion(model, a: int, n_tokens: int = 8192, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """A small learned attack: the least-squares linear map W with h1 @ W ~ embedding(token),
    fitted on random token sequences the attacker makes up (no access to the client's data)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n_tokens // seq_len, seq_len), generator=g)  # (N, T)
    h1 = split_model(model, (a, model.config.num_hidden_layers)).bottom(ids).flatten(0, 1)  # (N*T, d)
    target = model.get_input_embeddings()(ids).flatten(0, 1)  # (N*T, d)
    return torch.linalg.lstsq(h1, target).solution  # (d, d)


@torch.no_grad()
def learned_recovery_by_cut(model, input_ids, cuts, **fit_options) -> dict:
    """{a: fraction of input tokens recovered from h1 through fit_inversion's map}."""
    out = {}
    for a in cuts:
        h1 = split_model(model, (a, model.config.num_hidden_layers)).bottom(input_ids)  # (B, T, d)
        W = fit_inversion(model, a, **fit_options)
        out[a] = float((nearest_tokens(model, h1 @ W) == input_ids).float().mean())
    return out
