"""The split-point explorer's callback, called directly as the slider would."""

import pytest

from splitkit import load_model
from splitkit.explorer import explore, format_explore


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")[0]


@pytest.mark.parametrize("cuts", [(2, 4), (0, 3), (3, 6), (0, 6), (5, 6), (0, 1)])
def test_explore_reports_consistent_numbers_and_matching_gradients(model, cuts):
    r = explore(model, cuts, batch_size=2, seq_len=8)
    a, b = cuts
    assert r["blocks"] == {"bottom": a, "trunk": b - a, "top": 6 - b}
    assert r["bytes_per_step"]["detach"] == 2 * 2 * 8 * 64 * 4
    assert r["bytes_per_step"]["full"] == 2 * r["bytes_per_step"]["detach"]
    per_block = 8 * (64 + 64) + 8 * (64 + 32)  # LoRA r=8 on q_proj (64 -> 64) and v_proj (64 -> 2 kv heads x 16)
    assert r["trainable"] == {"bottom": a * per_block, "trunk": (b - a) * per_block, "top": (6 - b) * per_block}
    assert 0 < r["compute_share_server"] < 1
    assert r["grad_rel_diff"] <= 1e-5
    assert "gradient check" in format_explore(r)


def test_explore_refuses_an_empty_trunk(model):
    with pytest.raises(ValueError, match="the Trunk would be empty"):
        explore(model, (3, 3))


def test_plot_shows_blocks_parameters_and_lora_in_their_units(model):
    import matplotlib
    matplotlib.use("Agg")
    from splitkit.explorer import plot_explore

    r = explore(model, (1, 4), batch_size=2, seq_len=8, gradient_check=False)
    fig = plot_explore(r)
    heights = [[bar.get_height() for bar in ax.patches] for ax in fig.axes]
    assert heights[0] == [1, 3, 2]  # blocks, as counts
    assert heights[1] == pytest.approx([r["params"]["client"] / 1e6, r["params"]["server"] / 1e6])
    assert heights[2] == pytest.approx([v / 1e3 for v in r["trainable"].values()])
