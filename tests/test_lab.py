"""The lab's callback is a plain function: the modes train side by side and the numbers are measured."""

import threading
import time

import pytest

from splitkit import load_model
from splitkit.teaching.lab import LabSettings, format_rows, lab_widget, linear_layers, plot_lab, run_lab


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def result(tiny):
    model, tokenizer = tiny
    rounds = []
    settings = LabSettings(cuts=(1, 5), modes=("detach", "full"), steps=3, batch_size=4, lr=1e-2)
    out = run_lab(model, tokenizer, settings, on_step=lambda r: rounds.append(len(r.histories["full"].loss)))
    out.rounds = rounds
    return out


def test_each_mode_trains_the_steps_asked_for_with_a_callback_after_each(result):
    assert result.rounds == [1, 2, 3]
    assert {m: len(h.loss) for m, h in result.histories.items()} == {"detach": 3, "full": 3}


def test_the_detach_bottom_never_moves_and_the_full_bottom_does(result):
    rows = {row["mode"]: row for row in result.rows()}
    assert rows["detach"]["Bottom ΔW"] == 0.0 and rows["full"]["Bottom ΔW"] > 0


def test_bytes_per_step_come_from_the_client_counters(result):
    rows = {row["mode"]: row for row in result.rows()}
    sent = result.histories["full"].bytes_sent
    assert rows["full"]["bytes/step"] == sorted(s + r for s, r in zip(sent, result.histories["full"].bytes_received,
                                                                       strict=True))[1]
    assert 1.9 < rows["full"]["bytes/step"] / rows["detach"]["bytes/step"] < 2.1  # a backward each way


def test_exact_match_is_reported_on_trained_and_held_out_facts(result):
    assert result.exact_match.keys() == {"detach", "full"}
    for train, held in result.exact_match.values():
        assert 0.0 <= train <= 1.0 and 0.0 <= held <= 1.0


def test_the_plot_and_the_table(result, tiny):
    assert plot_lab(result, tiny[0].config.num_hidden_layers)[:8] == b"\x89PNG\r\n\x1a\n"
    html = format_rows(result)
    assert html.count("<tr>") == 3 and "<td>detach</td>" in html and "<td>0</td>" in html


def test_stop_ends_the_run_early(tiny):
    model, tokenizer = tiny
    stop = threading.Event()
    result = run_lab(model, tokenizer, LabSettings(cuts=(1, 5), modes=("full",), steps=50, batch_size=4),
                     on_step=lambda r: stop.set(), stop=stop)
    assert result.stopped and len(result.histories["full"].loss) == 1


def test_the_widget_trains_when_train_is_clicked(tiny):
    model, tokenizer = tiny
    widget = lab_widget(model, tokenizer, LabSettings(cuts=(1, 5), modes=("detach",), steps=2, batch_size=4))
    assert "q_proj" in linear_layers(model)
    train = next(c for box in widget.children if hasattr(box, "children") for c in box.children
                 if getattr(c, "description", "") == "Train")
    table = widget.children[-1]
    train.click()
    deadline = time.monotonic() + 60
    while "splitkit-lab" not in table.value and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "<td>detach</td>" in table.value and widget.children[-2].value[:4] == b"\x89PNG"


def test_the_lab_trains_on_the_class_server_when_it_runs_the_labs_cuts(tiny, monkeypatch):
    from splitkit import TrunkClient, TrunkServer

    model, tokenizer = tiny
    server = TrunkServer(model, (1, 5), bind="tcp://127.0.0.1:*")
    monkeypatch.setenv("SPLITKIT_TRUNK", server.start())
    try:
        fits = run_lab(model, tokenizer, LabSettings(cuts=(1, 5), modes=("full",), steps=2, batch_size=4))
        other = run_lab(model, tokenizer, LabSettings(cuts=(2, 5), modes=("full",), steps=2, batch_size=4))
        with TrunkClient(server.address, timeout=5) as c:
            answered = c.stats()["answered"]
    finally:
        server.stop()
    assert fits.trunk == f"using the class server at {server.address} (tiny-llama, cuts (1, 5))"
    assert other.trunk.startswith(f"the class server at {server.address} runs cuts (1, 5), not (2, 5): started")
    assert answered["backward"] == 2 and answered["hello"] == 1  # the first run's two steps, and no more
    assert other.trunk in format_rows(other) and len(other.histories["full"].loss) == 2
