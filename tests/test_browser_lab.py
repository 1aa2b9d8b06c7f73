"""The lab in a real browser (07_lab): set a thin Bottom, press Train, and read what the widget shows.

The widget must show a loss plot and a table with a row for detach and for full, the detach Bottom's
ΔW exactly 0 and full's not, and losses equal to those of the same run made here with run_lab.
"""

import re

import pytest

from .browser_harness import assert_no_errors, run_all_from_cleared_outputs, shot
from .test_browser import browser, lab  # noqa: F401  (the same JupyterLab and Chromium fixtures)

CUTS = (2, 28)
STEPS, BATCH = 5, 4  # as the widget cell of 07_lab sets them


@pytest.fixture(scope="module")
def expected():
    """The same lab run in this process: what the browser must show."""
    from splitkit import load_model
    from splitkit.teaching.lab import LabSettings, run_lab

    model, tokenizer = load_model("smollm2-135m")
    result = run_lab(model, tokenizer, LabSettings(cuts=CUTS, modes=("detach", "full"), steps=STEPS, batch_size=BATCH))
    return {row["mode"]: row for row in result.rows()}


def test_the_lab_trains_a_thin_bottom_in_the_browser(lab, browser, expected):  # noqa: F811
    with lab.open(browser, "07_lab.ipynb", "07_lab") as page:
        run_all_from_cleared_outputs(page, timeout_s=400)
        assert_no_errors(page)
        widget = page.locator(".jp-OutputArea-output .widget-vbox").filter(
            has=page.locator("button", has_text=re.compile("^Train$")))
        assert widget.count() == 1, f"the lab widget is not shown ({widget.count()} found)"
        cuts = widget.locator(".widget-inline-hbox").filter(has=page.locator("label", has_text=re.compile("^cuts$")))
        readout = cuts.locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type(f"{CUTS[0]}-{CUTS[1]}")
        page.keyboard.press("Enter")
        page.wait_for_function("e => /2\\D+28/.test(e.textContent)", arg=readout.element_handle())
        widget.locator("button", has_text=re.compile("^Train$")).click()
        table = widget.locator("table.splitkit-lab")
        table.wait_for(timeout=300_000)
        shot(page, "07_lab_after_training", widget)
        assert_no_errors(page)
        header = table.locator("th").all_inner_texts()
        rows = {cells[0]: dict(zip(header, cells, strict=True)) for cells in table.locator("tr").evaluate_all(
            "rows => rows.slice(1).map(r => [...r.querySelectorAll('td')].map(td => td.textContent.trim()))")}
        assert set(rows) == {"detach", "full"}, rows
        assert f"cuts {CUTS}" in widget.inner_text()
        assert rows["detach"]["Bottom ΔW"] == "0" and rows["full"]["Bottom ΔW"] != "0", rows
        for mode, row in rows.items():
            assert row["steps"] == str(STEPS)
            assert abs(float(row["loss"]) - expected[mode]["loss"]) < 2e-3, (mode, row["loss"], expected[mode]["loss"])
        image = widget.locator("img")
        assert image.count() == 1 and image.evaluate("i => i.complete && i.naturalWidth > 300")
