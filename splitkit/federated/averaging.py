"""Averaging LoRA across clients: the mean of B·A, and that mean factored back into rank r by SVD (the "product"
averaging), and how far any average is from it."""


import torch


def mean_products(clients: dict, weights: dict) -> dict:
    """{layer: the weighted mean of B·A over the clients} for every LoRA layer (named without .lora_A/.lora_B)."""
    total, first = sum(weights.values()), next(iter(clients.values()))
    layers = [name[: -len(".lora_A")] for name in first if name.endswith(".lora_A")]
    return {layer: sum(weights[k] / total * (s[f"{layer}.lora_B"] @ s[f"{layer}.lora_A"]) for k, s in clients.items())
            for layer in layers}


def average_products(clients: dict, weights: dict) -> dict:
    """Per layer, the weighted mean of B·A over the clients, factored back into A (r, in) and B (out, r) by SVD:
    B = U_r √S_r, A = √S_r V_rᵀ, the best rank-r approximation of the mean product."""
    first, out = next(iter(clients.values())), {}
    for layer, mean in mean_products(clients, weights).items():
        r = first[f"{layer}.lora_A"].shape[0]
        u, s, vh = torch.linalg.svd(mean, full_matrices=False)
        root = s[:r].sqrt()
        out[f"{layer}.lora_A"], out[f"{layer}.lora_B"] = root[:, None] * vh[:r], u[:, :r] * root
    return out


def product_gap(clients: dict, weights: dict, average: dict) -> float:
    """‖B̄·Ā − mean(B·A)‖ / ‖mean(B·A)‖ over all layers together: how far an average is from the mean update."""
    num = den = 0.0
    for layer, mean in mean_products(clients, weights).items():
        num += float((average[f"{layer}.lora_B"] @ average[f"{layer}.lora_A"] - mean).norm() ** 2)
        den += float(mean.norm() ** 2)
    return (num / den) ** 0.5 if den else 0.0
