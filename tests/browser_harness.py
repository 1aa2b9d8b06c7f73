"""JupyterLab in a real browser: `make lab` on a free port, Debian's headless Chromium driven by Playwright,
and what a student does and sees there (menus, Run All, errors shown in cells, screenshots).

Screenshots go to screenshots/ (not in git).
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from splitkit.training.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "screenshots"
CHROMIUM = os.environ.get("SPLITKIT_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling home, which fails without internet access.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPTS = "[...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent)"
# The texts of the outputs that show an error: a traceback, a widget that failed to render, or splitkit's own.
ERROR_TEXTS = """() => {
    const outputs = [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')].map(o => o.innerText);
    const bad = outputs.filter(t => t.includes('Traceback (most recent call last)')
                                    || t.includes('Error displaying widget'));
    return bad.concat([...document.querySelectorAll('.jp-Notebook .splitkit-error')].map(e => e.innerText));
}"""
# Every image under the element (the whole page without one) decoded, then two animation frames drawn.
SETTLE = """async (root) => {
    const images = [...(root || document).querySelectorAll('img')];
    await Promise.all(images.map(i => i.decode().catch(() => null)));
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
}"""


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1, max_interval: float = 1.0) -> bool:
    """Call `condition` until it is true (True) or `timeout` seconds have passed (False), backing off between calls."""
    deadline = time.monotonic() + timeout
    while not condition():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))
        interval = min(2 * interval, max_interval)
    return True


@dataclass
class Lab:
    """A running JupyterLab: where it answers, its token, and the folder of notebooks it serves."""

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
            with suppress(Exception):  # the failure itself matters more than its screenshot
                shot(page, f"{name}_failed")
            raise
        finally:
            try:
                page.close()
            finally:
                self.shut_down_kernels()

    def shut_down_kernels(self):
        """Shut down the kernel of every open session."""
        with urllib.request.urlopen(f"{self.url}/api/sessions?token={self.token}") as r:
            sessions = json.load(r)
        for session in sessions:
            request = urllib.request.Request(f"{self.url}/api/sessions/{session['id']}?token={self.token}",
                                             method="DELETE")
            with urllib.request.urlopen(request):
                pass


@contextmanager
def running_lab(workdir: Path, timeout: float = 120) -> Iterator[Lab]:
    """`make lab` on a free loopback port with a token, serving a copy of the notebooks (Lab autosaves).

    The copy, Lab's settings and its log (lab.log) go to `workdir`; Lab is stopped on leaving.
    """
    folder = workdir / "notebooks"
    folder.mkdir()
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, folder)
    settings = workdir / "lab-settings"  # a fresh user: Lab's own defaults and the kit's (python -m splitkit prepare)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_TOKEN=token, JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(settings / "workspaces"))
    env.pop("SPLITKIT_TRUNK", None)
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "lab.log", "w") as log, subprocess.Popen(
            ["make", "-s", "lab", f"PORT={port}", f"NOTEBOOKS={folder}",
             "LAB_ARGS=--no-browser --ServerApp.ip=127.0.0.1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True) as process:
        try:
            if not wait_until(lambda: _answers(f"{url}/api/status?token={token}", process), timeout):
                raise RuntimeError(f"JupyterLab did not answer at {url} within {timeout:g} s")
            yield Lab(url, token, folder)
        finally:
            _stop(process)


def _answers(url: str, process: subprocess.Popen) -> bool:
    """Whether `url` answers; raise if the process that should serve it has exited."""
    if process.poll() is not None:
        raise RuntimeError(f"`make lab` exited with {process.returncode}")
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen, timeout: float = 30):
    """SIGTERM to the process group of `process`, SIGKILL if it is still there after `timeout` seconds."""
    if process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def missing_chromium() -> str | None:
    """What is wrong when there is no Chromium at CHROMIUM, or None."""
    if Path(CHROMIUM).exists():
        return None
    return (f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package "
            f"(or set SPLITKIT_CHROMIUM to another Chromium)")


@contextmanager
def chromium():
    """Headless Chromium at CHROMIUM, launched by Playwright; closed on leaving."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def run_all_from_cleared_outputs(page, timeout_s: float):
    """View > Expand All Code (a folded check cell keeps the prompt it had when folded), Edit > Clear Outputs of All
    Cells, then Run > Run All Cells; wait until every cell has run."""
    menu(page, "View", "Expand All Code")
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


def error_texts(page) -> list[str]:
    """The end of each error that a cell of the notebook shows."""
    return [t[-800:] for t in page.evaluate(ERROR_TEXTS)]


def assert_no_errors(page):
    """Fail with the errors shown if any cell shows one."""
    errors = error_texts(page)
    assert not errors, "a cell shows an error:\n" + "\n".join(errors)


def settle(target):
    """Wait until the images of `target` (a page, or a locator for one element) are decoded and drawn."""
    target.evaluate(SETTLE)


def shot(page, name: str, element=None):
    """A screenshot of the JupyterLab window, scrolled so that `element` is at the top."""
    SHOTS.mkdir(exist_ok=True)
    if element is not None:
        element.evaluate("e => e.scrollIntoView({block: 'start'})")
    settle(page)
    page.screenshot(path=SHOTS / f"{name}.png")
