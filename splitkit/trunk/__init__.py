"""The trunk server: TrunkServer answers one op per request on a ROUTER socket (`endpoint`), keeps each client's
session within its Limits (`state`, `sessions`), can simulate faults (`faults`), and shows a class live to its
teacher (`teacher`); BatchingServer (`batching`) runs the one-token generation steps of different sessions that wait
together as one batch; `command` is its command line (trunk_server.py, `python -m splitkit serve`).

It imports the core and the wire, never the client's training: the server sees only what crosses the wire.
"""
