"""Simulated failures for a trunk server, to show a class what the client survives.

As in the zguide's lpserver.py: replies that are lost or late, and a crash after N requests.
`trunk_server.py --simulate-faults drop=0.1,delay=0.2` turns them on.
"""

import logging
import time
from dataclasses import dataclass, fields

log = logging.getLogger("splitkit.trunk.server")


@dataclass
class Faults:
    """Simulated failures (zguide lpserver.py style): lost and late replies, a crash after N requests."""

    drop: float = 0.0     # probability that a reply is never sent
    delay: float = 0.0    # probability that a reply is sent late...
    delay_s: float = 1.0  # ...by this many seconds
    crash_after: int = 0  # stop dead after this many requests (0: never)
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> "Faults":
        """'drop=0.1,delay=0.2,delay_s=2,crash_after=50' -> Faults."""
        known = [f.name for f in fields(cls)]
        kwargs = {}
        for item in filter(None, text.split(",")):
            name, _, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(known)}")
            kwargs[name] = type(getattr(cls, name))(value)
        return cls(**kwargs)

    def crashes(self, requests: int) -> bool:
        """Whether the server stops dead now, having had `requests` requests."""
        if self.crash_after and requests >= self.crash_after:
            log.error("simulated crash after %d requests", requests)
            return True
        return False

    def lost(self, rng) -> bool:
        """Whether this reply is lost (never sent); one that is late is held back here first. `rng`: random.Random."""
        if self.drop and rng.random() < self.drop:
            return True
        if self.delay and rng.random() < self.delay:
            time.sleep(self.delay_s)
        return False
