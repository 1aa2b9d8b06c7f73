"""Shared fixtures: tiny models, SmolLM2, trunk servers on random loopback ports, and sockets that get closed."""

from contextlib import contextmanager

import pytest
import zmq

from splitkit import LoraSpec, TrunkClient, TrunkServer, load_model

RTOL = 1e-5  # split against unsplit: the largest relative difference a gradient check allows

# Time limits by kind (pytest-timeout), a unit test's in pyproject.toml. Each is several times the longest seen on a
# 2-core machine with a CPU hog beside the run (where OpenMP's threads fight the hog for a core: 04's training cell
# took 11 minutes there, 1.8 quiet), and far within CI's 90 minutes: a notebook cell, the class across namespaces and
# the browser tests, which start servers, JupyterLab and Flower's processes.
TIMEOUT_S = {"notebook cell": 1800, "test_netns_class.py": 1800, "test_browser.py": 1200, "test_browser_lab.py": 1200}


def pytest_collection_modifyitems(items):
    for item in items:
        kind = "notebook cell" if item.path.suffix == ".ipynb" else item.path.name
        if kind in TIMEOUT_S and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIMEOUT_S[kind]))


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


@pytest.fixture
def serve():
    """serve(model, cuts, **options) -> address of a TrunkServer in a thread; stopped after the test."""
    servers = []

    def start(model, cuts, **options):
        server = TrunkServer(model, cuts, bind="tcp://127.0.0.1:*", **options)
        servers.append(server)
        return server.start()

    start.servers = servers
    yield start
    for s in servers:
        s.stop()


def _dealer(address, timeout_ms: int = 5000) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.rcvtimeo = 0, timeout_ms
    sock.connect(address)
    return sock


@contextmanager
def _closed_afterwards(make, close):
    """A factory that calls `make` and remembers what it made, to `close` each one at the end, whatever happens."""
    made = []
    try:
        yield lambda *args, **kwargs: made.append(make(*args, **kwargs)) or made[-1]
    finally:
        for thing in made:
            close(thing)


@pytest.fixture
def client():
    """client(address, **options) -> a TrunkClient, closed after the test."""
    with _closed_afterwards(TrunkClient, TrunkClient.close) as make:
        yield make


@pytest.fixture
def raw_socket():
    """raw_socket(address) -> a DEALER socket that times out instead of hanging; closed with linger=0."""
    with _closed_afterwards(_dealer, lambda sock: sock.close(linger=0)) as make:
        yield make


@pytest.fixture
def spec():
    """A LoRA whose B starts non-zero, so that lora_A gets a gradient too."""
    return LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=3)
