"""The split-point explorer's callback, called directly as the slider would."""

import pytest

from splitkit import load_model
from splitkit.teaching.explorer import NOTHING_TO_COMPARE, explore, format_explore

B, T, D, N = 2, 8, 64, 6  # the batch explore measures with here; tiny-llama's hidden size and blocks
TENSOR = B * T * D * 4  # bytes of one float32 (B, T, d) tensor: h1, h2, dL/dh2 or dL/dh1
PER_BLOCK = 8 * (64 + 64) + 8 * (64 + 32)  # LoRA r=8 on q_proj (64 -> 64) and v_proj (64 -> 2 kv heads x 16)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")[0]


@pytest.mark.parametrize("cuts", [(2, 4), (0, 3), (3, 6), (0, 6), (5, 6), (0, 1)])
def test_explore_reports_consistent_numbers_and_matching_gradients(model, cuts):
    r = explore(model, cuts, batch_size=B, seq_len=T)
    a, b = cuts
    assert r["blocks"] == {"bottom": a, "trunk": b - a, "top": N - b}
    assert r["batch"] == (B, T)
    assert r["trainable"] == {"bottom": a * PER_BLOCK, "trunk": (b - a) * PER_BLOCK, "top": (N - b) * PER_BLOCK}
    assert 0 < r["compute_share_server"] < 1
    if a == 0 and b == N:  # no LoRA on the client: nothing to compare
        assert r["grad_rel_diff"] is None
        assert NOTHING_TO_COMPARE in format_explore(r)
    else:
        assert r["grad_rel_diff"] <= 1e-5
    assert "gradient check" in format_explore(r)


@pytest.mark.parametrize("cuts", [(2, 4), (3, 6), (5, 6), (1, 2)])
def test_with_a_bottom_full_moves_twice_the_tensors_and_bytes_of_detach(model, cuts):
    r = explore(model, cuts, batch_size=B, seq_len=T, gradient_check=False)
    sent = r["bytes_per_step"]
    assert r["tensors_per_step"] == {"detach": 2, "full": 4, "full+trunk": 4}  # h1, h2 (+ dL/dh2, dL/dh1)
    assert 0 < sent["detach"] - 2 * TENSOR < 500  # what is not a tensor is the JSON headers
    assert 0 < sent["full"] - 4 * TENSOR < 1000
    assert abs(sent["full"] - 2 * sent["detach"]) < 500
    trunk_lora = r["trainable"]["trunk"] * 4  # the step reply carries the Trunk's LoRA, float32
    assert 0 < sent["full+trunk"] - sent["full"] - trunk_lora < 10_000


@pytest.mark.parametrize("cuts", [(0, 3), (0, 1), (0, 6)])
def test_without_a_bottom_full_sends_no_gradient(model, cuts):
    """a = 0: nothing below the Trunk trains, so `full` moves h1 and h2 only, exactly as `detach` does."""
    r = explore(model, cuts, batch_size=B, seq_len=T, gradient_check=False)
    assert r["tensors_per_step"]["detach"] == r["tensors_per_step"]["full"] == 2
    assert r["bytes_per_step"]["full"] == r["bytes_per_step"]["detach"]
    assert r["tensors_per_step"]["full+trunk"] == 4  # the Trunk's LoRA still needs dL/dh2


def test_measured_bytes_do_not_depend_on_the_call_or_on_where_a_bottom_ends(model):
    """What the browser test relies on: the same cuts give the same table; and a > 0 cuts move the same bytes."""
    first, again = (explore(model, (2, 4), batch_size=B, seq_len=T, gradient_check=False) for _ in range(2))
    assert format_explore(first) == format_explore(again)
    other = explore(model, (1, 5), batch_size=B, seq_len=T, gradient_check=False)
    assert {m: other["bytes_per_step"][m] for m in ("detach", "full")} == \
           {m: first["bytes_per_step"][m] for m in ("detach", "full")}


def test_explore_refuses_an_empty_trunk(model):
    with pytest.raises(ValueError, match="the Trunk would be empty"):
        explore(model, (3, 3))


def test_plot_shows_blocks_parameters_lora_and_bytes_in_their_units(model):
    import matplotlib
    matplotlib.use("Agg")
    from splitkit.teaching.explorer import plot_explore

    r = explore(model, (1, 4), batch_size=B, seq_len=T, gradient_check=False)
    fig = plot_explore(r)
    heights = [[bar.get_height() for bar in ax.patches] for ax in fig.axes]
    assert heights[0] == [1, 3, 2]  # blocks, as counts
    assert heights[1] == pytest.approx([r["params"]["client"] / 1e6, r["params"]["server"] / 1e6])
    assert heights[2] == pytest.approx([v / 1e3 for v in r["trainable"].values()])
    assert heights[3] == pytest.approx([v / 1e3 for v in r["bytes_per_step"].values()])


def test_the_gradient_check_catches_a_gradient_that_never_came(model):
    """A Bottom left without its gradient (the simplified version's failure) fails the check; it is not skipped."""
    import torch

    from splitkit.teaching.explorer import format_grad_check, gradient_check_of

    want = {"bottom.0.lora_A": torch.ones(2), "top.5.lora_A": torch.ones(2)}
    assert gradient_check_of(dict(want), want) == 0.0
    assert gradient_check_of({"bottom.0.lora_A": None, "top.5.lora_A": torch.ones(2)}, want) == float("inf")
    assert gradient_check_of({"top.5.lora_A": torch.ones(2)}, want) == float("inf")
    assert gradient_check_of({}, {}) is None
    assert format_grad_check(float("inf")) == "gradients missing"
