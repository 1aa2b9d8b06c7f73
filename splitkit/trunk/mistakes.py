"""A trunk server that is wrong on purpose, for notebook 03: the mistake that comes after "add a backward message".

`IdentityJacobianServer` answers a backward without backpropagating through the Trunk. It keeps no graph of the
forward (as if it had run the Trunk on a detached copy of `h1`) and returns the `dL/dh2` it received as `dL/dh1`:
the identity in place of the Trunk's Jacobian. Nothing crashes, the Bottom gets gradients and the loss can
still fall; the gradients are wrong, and in `full+trunk` the Trunk's LoRA never gets one.
"""

from ..wire import codec as wire
from ..wire import protocol as P
from ..wire.protocol import Refused
from .server import TrunkServer, _came_in
from .sessions import Session


class IdentityJacobianServer(TrunkServer):
    """A trunk server whose backward returns dL/dh2 as dL/dh1 (the second mistake of notebook 03)."""

    def _backward(self, session: Session, header: dict, tensors: list) -> list:
        if session.mode == P.DETACH:
            raise Refused("this session was opened in detach mode; there is nothing to differentiate")
        g2 = self._hidden(tensors, (1, 2))[0]           # dL/dh2 (and h1, if the client sent it again: unused)
        session.pop(P.state_key(header))                # the forward's graph, dropped without a backward
        self.sessions.activate(session)
        return wire.encode(P.ok(header), [g2], dtype=_came_in(header))  # "dL/dh1" = dL/dh2: J taken as I
