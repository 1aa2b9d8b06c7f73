"""The notebooks in a real browser, the way a class uses them: JupyterLab started as `make lab`
starts it, driven by Playwright in Debian's headless Chromium.

- 05_split_explorer: Run All, then move the split-point slider twice (a drag and a typed value);
  each time the table must show the numbers `explore` gives for the new cuts, the plot must be
  redrawn, and no cell may show an error.
- The same with the slider's callback broken on purpose: the check above must catch it.
- 04_training: Run All from cleared outputs; the loss plot and the LoRA-change plot appear as images.

Screenshots of each state go to screenshots/ (not in git).
"""

import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "screenshots"
CHROMIUM = os.environ.get("SPLITKIT_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling home, which fails without internet access.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N_BLOCKS = 30  # SmolLM2
BREAK_THE_CALLBACK = """\
# broken on purpose by tests/test_browser.py: the slider's callback now fails on every move
import splitkit.explorer
def _broken(*args, **kwargs):
    raise RuntimeError("the explorer callback is broken")
splitkit.explorer.explore = _broken
"""


@dataclass
class Lab:
    url: str
    token: str
    folder: Path

    @contextmanager
    def open(self, browser, notebook: str, name: str):
        """A new page on `notebook`; closed afterwards, with a screenshot NAME_failed.png if something failed."""
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:  # a workspace of its own: no tabs left open by an earlier test
            page.goto(f"{self.url}/lab/workspaces/{name}/tree/{notebook}?token={self.token}")
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for()
            page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
            yield page
        except BaseException:
            shot(page, f"{name}_failed")
            raise
        finally:
            page.close()
            self.shut_down_kernels()

    def shut_down_kernels(self):
        with urllib.request.urlopen(f"{self.url}/api/sessions?token={self.token}") as r:
            sessions = json.load(r)
        for session in sessions:
            request = urllib.request.Request(f"{self.url}/api/sessions/{session['id']}?token={self.token}",
                                             method="DELETE")
            urllib.request.urlopen(request).close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`make lab` on a free loopback port with a token, serving a copy of the notebooks (Lab autosaves)."""
    folder = tmp_path_factory.mktemp("notebooks")
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, folder)
    settings = tmp_path_factory.mktemp("lab-settings")
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about news?" pop-up, no call out
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_TOKEN=token, JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(settings / "workspaces"))
    env.pop("SPLITKIT_TRUNK", None)
    log = open(tmp_path_factory.mktemp("lab-log") / "lab.log", "w")
    process = subprocess.Popen(["make", "-s", "lab", f"PORT={port}", f"NOTEBOOKS={folder}",
                                "LAB_ARGS=--no-browser --ServerApp.ip=127.0.0.1"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{url}/api/status?token={token}", process, timeout=120)
        yield Lab(url, token, folder)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package "
                    f"(or set SPLITKIT_CHROMIUM to another Chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def smollm2_explore():
    """The explorer's numbers computed here, to compare with what the browser shows."""
    from splitkit import load_model
    from splitkit.explorer import explore

    model, _ = load_model("smollm2-135m")
    return lambda cuts: explore(model, cuts, gradient_check=False)


def test_split_explorer_in_the_browser(lab, browser, smollm2_explore):
    with lab.open(browser, "05_split_explorer.ipynb", "05_explorer") as page:
        run_all_from_cleared_outputs(page, timeout_s=300)
        shot(page, "05_explorer_after_run_all")
        check_explorer(page, smollm2_explore, "05_explorer")


def test_a_broken_slider_callback_is_caught(lab, browser, smollm2_explore):
    """The check above fails when the callback raises only once the slider moves."""
    import nbformat

    path = lab.folder / "05_split_explorer_broken.ipynb"
    notebook = nbformat.read(lab.folder / "05_split_explorer.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(BREAK_THE_CALLBACK))
    nbformat.write(notebook, path)
    with lab.open(browser, path.name, "05_explorer_broken") as page:
        run_all_from_cleared_outputs(page, timeout_s=300)
        with pytest.raises(AssertionError, match="the explorer callback is broken"):
            check_explorer(page, smollm2_explore, "05_explorer_broken", wait_s=30)
        shot(page, "05_explorer_broken_caught")


def test_training_plots_in_the_browser(lab, browser):
    with lab.open(browser, "04_training.ipynb", "04_training") as page:
        run_all_from_cleared_outputs(page, timeout_s=900)
        assert_no_errors(page)
        for name, source in [("loss", "plot_losses(["), ("lora_change", "plot_lora_changes([")]:
            cell = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=source))
            assert cell.count() == 1, f"no single cell calls {source!r}"
            image = cell.locator(".jp-OutputArea-output img")
            assert image.count() == 1, f"the {name} cell shows {image.count()} images"
            image.scroll_into_view_if_needed()
            width, height, src = image.evaluate("i => [i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)]")
            assert src == "data:image/png;base64,", f"the {name} plot is not a PNG image: {src!r}"
            assert width > 300 and height > 150, f"the {name} plot is {width}x{height} pixels"
            cell.screenshot(path=SHOTS / f"04_training_{name}_plot.png")
        shot(page, "04_training_after_run_all")


# ---------------------------------------------------------------------- what a student does and sees

PROMPTS = "[...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent)"


def run_all_from_cleared_outputs(page, timeout_s: float):
    """Edit > Clear Outputs of All Cells, then Run > Run All Cells; wait until every cell has run."""
    menu(page, "Edit", "Clear Outputs of All Cells")
    assert page.locator(".jp-Notebook .jp-OutputArea-output").count() == 0
    menu(page, "Run", "Run All Cells")
    page.wait_for_function(f"() => {PROMPTS}.some(p => p.includes('[*]'))", polling=100)
    page.wait_for_function(f"() => {PROMPTS}.every(p => /\\[\\d+\\]/.test(p))", polling=500,
                           timeout=timeout_s * 1000)
    assert page.evaluate(f"() => {PROMPTS}.length") > 0


def menu(page, top: str, item: str):
    """Click TOP in the menu bar, then ITEM once it is enabled (it is once the notebook has the focus)."""
    page.locator(".jp-NotebookPanel .jp-Notebook").click(position={"x": 5, "y": 5})
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
    entry = page.locator(".lm-Menu-item:not(.lm-mod-disabled)").filter(
        has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}")))
    entry.first.click()
    page.locator(".lm-Menu").first.wait_for(state="hidden")


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


def explorer_state(widget) -> dict:
    readout = widget.locator(".widget-readout").inner_text()
    a, b = (int(x) for x in re.findall(r"\d+", readout)[:2])
    cells = widget.locator("table.splitkit-explore tr").evaluate_all(
        "rows => rows.map(r => [...r.querySelectorAll('td')].map(td => td.textContent.trim()))")
    table = {k: v for k, v in cells}
    images = widget.locator(".jp-OutputArea-output img").evaluate_all("imgs => imgs.map(i => [i.src, i.naturalWidth])")
    return {"cuts": (a, b), "table": table, "blocks": table.get("blocks (bottom / trunk / top)"),
            "images": images, "text": widget.inner_text()}


def wait_for_new_state(page, widget, before: dict, wait_s: float) -> dict:
    """Wait until the widget shows a table for cuts other than `before`'s, or say what it shows instead."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        errors = error_texts(page)
        assert not errors, "a cell shows an error after moving the slider:\n" + "\n".join(errors)
        state = explorer_state(widget)
        if state["blocks"] and state["table"] != before["table"] and state["images"] and state["images"][0][1]:
            widget.locator(".jp-OutputArea-output img").evaluate_all("imgs => Promise.all(imgs.map(i => i.decode()))")
            page.wait_for_timeout(1000)  # let the new plot settle into the layout before anyone looks
            return explorer_state(widget)
    raise AssertionError(f"the explorer did not redraw for the slider at {explorer_state(widget)['cuts']} "
                         f"within {wait_s:g} s; it shows:\n{explorer_state(widget)['text'][:500]}")


def assert_table_matches(state: dict, explore):
    """The numbers shown are those `explore` gives for the shown cuts; the plot is one image."""
    from splitkit.explorer import format_explore, plot_png

    a, b = state["cuts"]
    assert state["blocks"] == f"{a} / {b - a} / {N_BLOCKS - b}", state["table"]
    expected = re.findall(r"<td style='text-align:left'>(.*?)</td><td class='value' style='text-align:right'>(.*?)</td>",
                          format_explore(explore((a, b))))
    shown = dict(state["table"])
    check = shown.pop("gradient check vs unsplit (max rel. diff)", None)
    assert shown == dict(expected), f"cuts {(a, b)}: the table shows {shown}, explore gives {dict(expected)}"
    assert check is not None and float(check) <= 1e-5, f"gradient check shows {check!r}"
    assert len(state["images"]) == 1 and state["images"][0][1] > 300, f"plot: {state['images']}"
    shown_png = base64.b64decode(state["images"][0][0].split(",", 1)[1])
    assert shown_png == plot_png(explore((a, b))), f"cuts {(a, b)}: the plot shown is not the one for these cuts"


def error_texts(page) -> list[str]:
    texts = page.locator(".jp-Notebook .jp-OutputArea-output").evaluate_all(
        "outs => outs.map(o => o.innerText)")
    bad = [t for t in texts if "Traceback (most recent call last)" in t or "Error displaying widget" in t]
    bad += page.locator(".jp-Notebook .splitkit-error").all_inner_texts()
    return [t[-800:] for t in bad]


def assert_no_errors(page):
    errors = error_texts(page)
    assert not errors, "a cell shows an error:\n" + "\n".join(errors)


def shot(page, name: str, element=None):
    """A screenshot of the JupyterLab window, scrolled so that `element` is at the top."""
    SHOTS.mkdir(exist_ok=True)
    if element is not None:
        element.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.wait_for_timeout(500)
    page.screenshot(path=SHOTS / f"{name}.png")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, process, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`make lab` exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer at {url} within {timeout:g} s")
