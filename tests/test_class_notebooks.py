"""With $SPLITKIT_TRUNK naming a class server (`trunk_server.py` in a process of its own, as a teacher runs it),
notebook 07 trains there, and notebook 08's class view shows a session another student opened there. Both notebooks
run headless as nbval runs them, in a kernel that inherits the variable; what the server did is read from its own
`stats`."""

import nbformat
import pytest
from nbclient import NotebookClient

from splitkit import TrunkClient
from splitkit.training.testing import ROOT, ServerProcess

CUTS = (2, 28)  # the cuts of 07's run: its class server must run these to be used


@pytest.fixture(scope="module")
def class_server():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the server's torch on one thread: on 2 busy cores, two processes of 2
        server = ServerProcess("smollm2-135m", CUTS)  # threads each wait on each other's (a step 5-10x slower)
    with server:
        yield server.address


def run_notebook(name: str, monkeypatch, address: str) -> str:
    """Execute notebooks/NAME with $SPLITKIT_TRUNK = address; return the text of every cell's output."""
    monkeypatch.setenv("SPLITKIT_TRUNK", address)
    monkeypatch.delenv("SPLITKIT_CURVE_DIR", raising=False)
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return "\n".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))


def stats(address: str) -> dict:
    with TrunkClient(address, timeout=10, retries=0) as client:
        return client.stats()


def test_the_lab_trains_on_the_class_server_and_the_teachers_view_shows_a_student_there(class_server, smollm2,
                                                                                        monkeypatch):
    out = run_notebook("07_lab.ipynb", monkeypatch, class_server)
    assert f"using the class server at {class_server} (smollm2-135m, cuts (2, 28))" in out
    after_07 = stats(class_server)
    assert after_07["answered"]["hello"] == 2  # the run's detach and full sessions
    assert after_07["answered"]["backward"] == 10  # full's 10 steps, one backward each; detach sends none
    assert after_07["answered"]["bye"] == 2 and after_07["sessions"] == 0

    with TrunkClient(class_server, timeout=30) as student:  # another student, working on the class server
        student.hello(smollm2[0], CUTS, mode="full")
        out = run_notebook("08_teachers_view.ipynb", monkeypatch, class_server)
        assert (f"the class server at {class_server}: smollm2-135m, cuts (2, 28); open sessions 1: "
                f"{student.session[:6]} (full)") in out
