"""The trunk server stays short enough to read in one sitting: splitkit/server.py at most 300 lines and
TrunkServer at most 200, the loop and one short method per op. What is neither lives elsewhere: the socket
in endpoint.py, the session table and its stats in sessions.py, the simulated faults in faults.py."""

import inspect
from pathlib import Path

from splitkit import server

FILE_LINES, CLASS_LINES = 300, 200


def test_server_py_and_its_class_stay_within_their_line_bars():
    file_lines = len(Path(server.__file__).read_text().splitlines())
    class_lines = len(inspect.getsourcelines(server.TrunkServer)[0])
    assert file_lines <= FILE_LINES, f"splitkit/server.py has {file_lines} lines, over {FILE_LINES}"
    assert class_lines <= CLASS_LINES, f"TrunkServer has {class_lines} lines, over {CLASS_LINES}"


def test_what_other_modules_import_from_server_is_still_there():
    from splitkit.server import DEFAULT_BIND, Faults, TrunkServer, connect_or_start  # noqa: F401
    for name in ("_forward", "_backward", "_forward_with_graph"):  # privacy.py and notebook 03 use these
        assert list(inspect.signature(getattr(TrunkServer, name)).parameters)[:2] == ["self", "session"]
