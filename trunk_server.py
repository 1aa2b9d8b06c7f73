"""Trunk server: the middle blocks of a causal LM, served over ZeroMQ (reliable request-reply).

Run:  python trunk_server.py --model smollm2-135m --cuts 10 20
Then point a notebook at it:  SPLITKIT_TRUNK=tcp://127.0.0.1:5555 jupyter lab
The server is splitkit.trunk.server.TrunkServer; its command line is splitkit.trunk.command, which
`python -m splitkit serve` runs too.
"""

import os
import sys

# The server's OpenMP threads sleep between requests instead of spinning on the cores its clients need, unless the
# environment says otherwise. libgomp reads this once, when torch loads, so it is set before the first import that
# loads torch, and only in the server's own process: imported (by a test, say), this file leaves the environment,
# and so the processes started after it, as they were.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from splitkit.trunk.command import LIMIT_FLAGS, limits_from, main, parse_args  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(main())
