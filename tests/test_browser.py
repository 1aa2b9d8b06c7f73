"""The notebooks in a real browser, the way a class uses them: JupyterLab started as `make lab`
starts it, driven by Playwright in Debian's headless Chromium (see browser_harness.py).

- 05_split_explorer (its set-up, default split and slider; nbval runs the rest): Run All, then move the
  split-point slider twice (a drag and a typed value);
  each time the table must show the numbers `explore` gives for the new cuts, the plot must be
  redrawn, and no cell may show an error.
- The same with the slider's callback broken on purpose: the check above must catch it.
- 01_building_the_split as committed: no pop-up over the lesson (Jupyter's news prompt); each check cell is
  folded, its code hidden and its printed evidence showing, and one click on the fold shows the code.
- 08_teachers_view: Run All from cleared outputs; while the class of the notebook trains, the live view's
  numbers of requests and training steps move, and the plot appears as a PNG image.

Screenshots of each state go to screenshots/ (not in git).
"""

import base64
import re
import time

import pytest

from .browser_harness import (
    ERROR_TEXTS,
    PROMPTS,
    assert_no_errors,
    chromium,
    error_texts,
    menu,
    missing_chromium,
    run_all_from_cleared_outputs,
    running_lab,
    settle,
    shot,
)

N_BLOCKS = 30  # SmolLM2
BREAK_THE_CALLBACK = """\
# broken on purpose by tests/test_browser.py: the slider's callback now fails on every move
import splitkit.teaching.explorer
def _broken(*args, **kwargs):
    raise RuntimeError("the explorer callback is broken")
splitkit.teaching.explorer.explore = _broken
"""
BLOCKS = "blocks (bottom / trunk / top)"
# a row of the table format_explore writes: (name, value)
TABLE_ROW = r"<td style='text-align:left'>(.*?)</td><td class='value' style='text-align:right'>(.*?)</td>"
# True once a cell shows an error, or once the widget shows a table with blocks that differs from
# `before` and a plot image that has loaded.
REDRAWN = f"""([widget, before]) => {{
    if (({ERROR_TEXTS})().length > 0) return true;
    const rows = [...widget.querySelectorAll('table.splitkit-explore tr')]
        .map(r => [...r.querySelectorAll('td')].map(td => td.textContent.trim()));
    const table = Object.fromEntries(rows);
    const same = Object.keys(table).length === Object.keys(before).length
        && Object.entries(before).every(([k, v]) => table[k] === v);
    const image = widget.querySelector('.jp-OutputArea-output img');
    return Boolean(table[{BLOCKS!r}]) && !same && image !== null && image.complete && image.naturalWidth > 0;
}}"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`make lab` on a free loopback port with a token, serving a copy of the notebooks."""
    with running_lab(tmp_path_factory.mktemp("lab")) as lab:
        yield lab


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by Playwright."""
    problem = missing_chromium()
    if problem:
        pytest.fail(problem)
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def smollm2_explore():
    """The explorer's numbers computed here, to compare with what the browser shows."""
    from splitkit import load_model
    from splitkit.teaching.explorer import explore

    model, _ = load_model("smollm2-135m")
    return lambda cuts: explore(model, cuts, gradient_check=False)


def test_split_explorer_in_the_browser(lab, browser, smollm2_explore):
    with lab.open(browser, explorer_notebook(lab, "05_split_explorer_slider"), "05_explorer") as page:
        run_all_from_cleared_outputs(page, timeout_s=300)
        shot(page, "05_explorer_after_run_all")
        check_explorer(page, smollm2_explore, "05_explorer")


def test_a_broken_slider_callback_is_caught(lab, browser, smollm2_explore):
    """The check above fails when the callback raises only once the slider moves."""
    with lab.open(browser, explorer_notebook(lab, "05_split_explorer_broken", BREAK_THE_CALLBACK),
                  "05_explorer_broken") as page:
        run_all_from_cleared_outputs(page, timeout_s=300)
        with pytest.raises(AssertionError, match="the explorer callback is broken"):
            check_explorer(page, smollm2_explore, "05_explorer_broken", wait_s=30)
        shot(page, "05_explorer_broken_caught")


def read_view(page, seen: list):
    """Append the live teacher's view's requests, steps and sessions to `seen`, unless it is being redrawn."""
    shown = page.evaluate("() => { const v = document.querySelector('.jp-OutputArea-output .widget-html "
                          ".splitkit-view'); return ['requests', 'steps', 'sessions'].map(k => "
                          "v?.querySelector('.sk-' + k)?.textContent ?? ''); }")
    if all(shown):
        seen.append(dict(zip(("requests", "steps", "sessions"), shown, strict=True)))


def explorer_notebook(lab, name: str, extra: str | None = None) -> str:
    """05's set-up, its default split and its slider (nbval runs the checks between), and `extra`, as NAME.ipynb."""
    import nbformat

    notebook = nbformat.read(lab.folder / "05_split_explorer.ipynb", as_version=4)
    keep = ("# setup:", "# what this does: the explorer's numbers", "# what this does: the slider")
    notebook.cells = [c for c in notebook.cells if c.cell_type == "code" and c.source.startswith(keep)]
    assert len(notebook.cells) == len(keep)
    if extra:
        notebook.cells.append(nbformat.v4.new_code_cell(extra))
    nbformat.write(notebook, lab.folder / f"{name}.ipynb")
    return f"{name}.ipynb"


def test_the_teachers_view_moves_while_the_class_trains(lab, browser):
    with lab.open(browser, "08_teachers_view.ipynb", "08_teachers_view") as page:
        menu(page, "View", "Expand All Code")  # a folded check cell keeps the prompt it had when folded
        menu(page, "Edit", "Clear Outputs of All Cells")
        menu(page, "Run", "Run All Cells")
        # the widget's container stays; the view inside it is drawn anew with every answer, so read it by a query
        live = page.locator(".jp-OutputArea-output .widget-html").filter(has=page.locator(".splitkit-view"))
        live.first.wait_for(timeout=120_000)
        seen, deadline = [], time.monotonic() + 600
        while not page.evaluate(f"() => {PROMPTS}.every(p => /\\[\\d+\\]/.test(p))"):
            assert time.monotonic() < deadline, f"the notebook did not finish within 600 s; the view showed {seen[-3:]}"
            read_view(page, seen)
            if len(seen) == 8:
                shot(page, "08_teachers_view_while_training")
            page.wait_for_timeout(500)
        read_view(page, seen)  # as the notebook left it
        assert_no_errors(page)
        requests = [int(s["requests"]) for s in seen]
        steps = [int(s["steps"]) for s in seen]
        assert len(set(requests)) >= 3 and requests == sorted(requests), f"requests shown: {requests}"
        # the class's 16 steps, then the one step by hand
        assert steps[0] == 0 and steps[-1] == 17 and len(set(steps)) >= 3, f"steps shown: {steps}"
        assert max(int(s["sessions"]) for s in seen) >= 2, seen
        plot = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text="ax.step(")) \
            .locator(".jp-OutputArea-output img")
        assert plot.count() == 1
        plot.scroll_into_view_if_needed()
        width, src = plot.evaluate("i => [i.naturalWidth, i.src.slice(0, 22)]")
        assert src == "data:image/png;base64," and width > 300, (src, width)
        shot(page, "08_teachers_view_after_run_all")


# ---------------------------------------------------------------------- the split-point explorer

def check_explorer(page, explore, name: str, wait_s: float = 120):
    """Move the slider twice; each time the table and the plot must follow, and no cell may show an error."""
    widget = page.locator(".jp-OutputArea-output .widget-vbox").filter(has=page.locator(".widget-readout"))
    assert widget.count() == 1, f"the explorer widget is not shown ({widget.count()} found)"
    widget.scroll_into_view_if_needed()
    assert_no_errors(page)
    state = explorer_state(widget)
    assert state["cuts"] == (10, 20) and state["blocks"] == "10 / 10 / 10", state
    assert_table_matches(state, explore)

    # 1. drag the lower handle to about a third of its place
    handle, track = widget.locator(".noUi-handle-lower"), widget.locator(".noUi-base")
    bring_into_view(page, track)
    box, start = track.bounding_box(), handle.bounding_box()
    page.mouse.move(start["x"] + start["width"] / 2, start["y"] + start["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 4 / N_BLOCKS, start["y"] + start["height"] / 2, steps=10)
    page.mouse.up()
    state = wait_for_new_state(page, widget, state, wait_s)
    assert state["cuts"][0] < 10 and state["cuts"][1] == 20, f"the drag left the cuts at {state['cuts']}"
    assert_table_matches(state, explore)
    shot(page, f"{name}_after_drag", widget)

    # 2. type a pair into the slider's readout, as ipywidgets allows
    readout = widget.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("15-25")
    page.keyboard.press("Enter")
    state = wait_for_new_state(page, widget, state, wait_s)
    assert state["cuts"] == (15, 25), f"typing 15-25 set the cuts to {state['cuts']}"
    assert_table_matches(state, explore)
    shot(page, f"{name}_after_typing", widget)


def bring_into_view(page, element, tries: int = 40):
    """Scroll `element` into the window and wait until it stays put: cells above it (a tall figure) may
    still be laying out after a scroll, and a drag aimed at a stale position misses the slider."""
    previous = None
    for _ in range(tries):
        element.scroll_into_view_if_needed()
        settle(page)
        box = element.bounding_box()
        if box is not None and box == previous and 0 <= box["y"] <= page.viewport_size["height"] - box["height"]:
            return
        previous = box
        page.wait_for_timeout(250)
    raise AssertionError(f"the slider does not stay in view: last at {previous}")


def explorer_state(widget) -> dict:
    """What the explorer widget shows: the cuts in the readout, the table, the plot images and all its text."""
    readout = widget.locator(".widget-readout").inner_text()
    a, b = (int(x) for x in re.findall(r"\d+", readout)[:2])
    cells = widget.locator("table.splitkit-explore tr").evaluate_all(
        "rows => rows.map(r => [...r.querySelectorAll('td')].map(td => td.textContent.trim()))")
    table = {k: v for k, v in cells}
    images = widget.locator(".jp-OutputArea-output img").evaluate_all("imgs => imgs.map(i => [i.src, i.naturalWidth])")
    return {"cuts": (a, b), "table": table, "blocks": table.get(BLOCKS),
            "images": images, "text": widget.inner_text()}


def wait_for_new_state(page, widget, before: dict, wait_s: float) -> dict:
    """Wait until the widget shows a table for cuts other than `before`'s, or say what it shows instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    handle = widget.element_handle()
    try:
        page.wait_for_function(REDRAWN, arg=[handle, before["table"]], polling=250, timeout=wait_s * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"the explorer did not redraw for the slider at {explorer_state(widget)['cuts']} "
                             f"within {wait_s:g} s; it shows:\n{explorer_state(widget)['text'][:500]}") from None
    finally:
        handle.dispose()
    errors = error_texts(page)
    assert not errors, "a cell shows an error after moving the slider:\n" + "\n".join(errors)
    settle(widget)  # the new plot decoded and laid out before anyone looks
    return explorer_state(widget)


def assert_table_matches(state: dict, explore):
    """The numbers shown are those `explore` gives for the shown cuts; the plot is one image."""
    from splitkit.teaching.explorer import NOTHING_TO_COMPARE, format_explore, plot_png

    a, b = state["cuts"]
    assert state["blocks"] == f"{a} / {b - a} / {N_BLOCKS - b}", state["table"]
    expected = re.findall(TABLE_ROW, format_explore(explore((a, b))))
    shown = dict(state["table"])
    check = shown.pop("gradient check vs unsplit (max rel. diff)", None)
    assert shown == dict(expected), f"cuts {(a, b)}: the table shows {shown}, explore gives {dict(expected)}"
    if (a, b) == (0, N_BLOCKS):  # no LoRA on the client: no gradient to compare
        assert check == NOTHING_TO_COMPARE, f"gradient check shows {check!r}"
    else:
        assert check is not None and float(check) <= 1e-5, f"gradient check shows {check!r}"
    assert len(state["images"]) == 1 and state["images"][0][1] > 300, f"plot: {state['images']}"
    shown_png = base64.b64decode(state["images"][0][0].split(",", 1)[1])
    assert shown_png == plot_png(explore((a, b))), f"cuts {(a, b)}: the plot shown is not the one for these cuts"


# For each code cell, scrolled into view first (JupyterLab draws only what is near the view): whether its code is
# hidden, whether the fold's placeholder shows, and the text of its outputs.
FOLDED = """async () => {
    const found = [];
    for (const cell of document.querySelectorAll('.jp-Notebook .jp-CodeCell')) {
        cell.scrollIntoView({block: 'center'});
        await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        const input = cell.querySelector('.jp-InputArea');
        found.push({hidden: input === null || input.offsetParent === null,
                    placeholder: cell.querySelector('.jp-InputPlaceholder') !== null,
                    output: [...cell.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText).join('\\n')});
    }
    return found;
}"""


def test_checks_are_folded_with_their_evidence_showing(lab, browser):
    import json

    from splitkit.teaching.course import is_check

    name = "01_building_the_split.ipynb"
    cells = [c for c in json.loads((lab.folder / name).read_text())["cells"] if c["cell_type"] == "code"]
    with lab.open(browser, name, "01_folded") as page:
        page.wait_for_timeout(3000)  # the news prompt, where there is one, comes a moment after the notebook
        shot(page, "01_as_opened")
        assert page.get_by_text("official Jupyter news").count() == 0
        assert page.locator(".jp-Notification-Toast").count() == 0
        shown = page.evaluate(FOLDED)
        assert len(shown) == len(cells)
        checks = [i for i, c in enumerate(cells) if is_check(c)]
        assert len(checks) >= 10
        for i, cell in enumerate(cells):
            want_hidden = i in checks
            assert shown[i]["hidden"] == want_hidden and shown[i]["placeholder"] == want_hidden, (i, shown[i])
            if want_hidden:  # the printed evidence shows: the first line the check printed, as committed
                printed = "".join("".join(o["text"]) for o in cell["outputs"] if o["output_type"] == "stream")
                if printed.strip():
                    assert printed.strip().splitlines()[0].strip() in shown[i]["output"], (i, shown[i]["output"])
        first = page.locator(".jp-Notebook .jp-CodeCell").nth(checks[0])
        first.locator(".jp-InputPlaceholder").click()
        first.locator(".jp-InputArea .cm-content").wait_for()
        assert first.locator(".jp-InputArea .cm-content").inner_text().startswith("# check 1.")
        shot(page, "01_check_unfolded", first)
        assert page.evaluate(FOLDED)[checks[1]]["hidden"]  # the others stay folded
