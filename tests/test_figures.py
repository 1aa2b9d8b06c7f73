"""The pictures draw what they are given: arrow colours follow the measured flows, one arrow pair per message."""

import pytest
from matplotlib.colors import to_hex

from splitkit.teaching.figures import draw_message_sequence, draw_u_shape


def backward_arrows(fig) -> dict:
    """{label: colour} of the backward arrows' labels (the texts that start with 'dL/')."""
    ax = fig.axes[0]
    return {t.get_text().split(" ")[0]: to_hex(t.get_color()) for t in ax.texts if t.get_text().startswith("dL/")}


@pytest.mark.parametrize("crossed", [True, False])
def test_the_u_shape_colours_each_backward_arrow_as_measured(crossed):
    flows = {"loss→top": True, "top→trunk": crossed, "trunk→bottom": crossed}
    colours = backward_arrows(draw_u_shape(flows))
    assert colours["dL/dlogits"] == to_hex("green")
    assert colours["dL/dh2"] == colours["dL/dh1"] == to_hex("green" if crossed else "red")


def test_the_plain_u_shape_draws_every_arrow_in_blue():
    assert set(backward_arrows(draw_u_shape()).values()) == {to_hex("tab:blue")}


def test_the_sequence_shows_each_message_and_each_refusal():
    messages = [{"op": "forward", "sent": [[2, 3, 4]], "sent_bytes": 100, "received": [[2, 3, 4]],
                 "received_bytes": 96, "code": None},
                {"op": "backward", "sent": [[2, 3, 4]], "sent_bytes": 100, "received": [], "received_bytes": 80,
                 "code": "state_missing"}]
    texts = [t.get_text() for t in draw_message_sequence(messages).axes[0].texts]
    assert "forward: (2, 3, 4), 100 B" in texts and "reply: (2, 3, 4), 96 B" in texts
    assert "backward: (2, 3, 4), 100 B" in texts and "refused: state_missing" in texts
