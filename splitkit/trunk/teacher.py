"""The teacher's view: the shared trunk server, live, in a notebook widget that polls its `stats` op.

TeacherView(address) asks the server for its stats every `interval` seconds from a thread of its own,
keeps every answer in `samples`, and shows what the server holds now (sessions by mode, forward
states, KV caches, memory), what it does per second (requests, training steps, bytes each way,
refusals) and a line per open session. It is one more client of the server: its own requests count.
"""

import html
import threading
import time

import ipywidgets as widgets

from ..wire.client import TrunkClient, TrunkError

MIB = 1 << 20


def rates(before: dict, after: dict) -> dict:
    """Per second, between two samples (each a stats answer with its "t", the client's clock): requests, training
    steps (backwards: one per step of a full or full+trunk client), forwards, bytes in and out, refusals."""
    dt = after["t"] - before["t"]
    if dt <= 0:
        raise ValueError("the second sample must come after the first")

    def per_s(get):
        return (get(after) - get(before)) / dt

    return {"requests": per_s(lambda s: s["requests"]),
            "steps": per_s(lambda s: s["answered"].get("backward", 0)),
            "forwards": per_s(lambda s: s["answered"].get("forward", 0)),
            "bytes_in": per_s(lambda s: s["bytes_in"]), "bytes_out": per_s(lambda s: s["bytes_out"]),
            "refusals": per_s(lambda s: s["errors"])}


class TeacherView:
    """A live widget of one trunk server; display it, stop() it when done (it stops itself after `limit` s)."""

    def __init__(self, address: str, interval: float = 1.0, limit: float = 3600.0, **client_options):
        self.address, self.interval, self.limit = address, interval, limit
        self.client = TrunkClient(address, **{"timeout": 5.0, "retries": 0, **client_options})
        self.samples: list[dict] = []
        self.widget = widgets.HTML()
        self._stop, self._lock = threading.Event(), threading.Lock()  # one socket, asked from two threads
        self._thread = threading.Thread(target=self._poll, name="teacher-view", daemon=True)
        self.sample()
        self._thread.start()

    def sample(self) -> dict:
        """Ask the server once; show and keep the answer (with "t", when it came)."""
        with self._lock:
            try:
                stats = {**self.client.stats(), "t": time.monotonic()}
            except TrunkError as e:
                self.widget.value = (f"<div class='splitkit-view'><b>no answer from {html.escape(self.address)}</b>: "
                                     f"{html.escape(str(e))}</div>")
                return {}
            self.samples.append(stats)
            self.widget.value = render(stats, rates(self.samples[-2], stats) if len(self.samples) > 1 else None)
            return stats

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self.client.close()

    def _poll(self):
        deadline = time.monotonic() + self.limit
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            self.sample()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def render(stats: dict, rate: dict | None) -> str:
    """The view's HTML: each number in an element of class sk-NAME, for a reader and for a browser test."""
    modes = ", ".join(f"{n} {m}" for m, n in sorted(stats.get("modes", {}).items())) or "none"
    refused = ", ".join(f"{n} {c}" for c, n in sorted(stats.get("refused", {}).items())) or "none"
    rss = stats.get("rss_bytes")
    now = [("sessions", "sessions", stats["sessions"]), ("modes", "by mode", modes),
           ("states", "forward states", stats["states"]),
           ("state-mb", "their h1 and h2, MiB", f"{stats['state_bytes'] / MIB:.2f}"),
           ("generations", "KV caches", stats["generations"]),
           ("cache-mb", "their keys and values, MiB", f"{stats['cache_bytes'] / MIB:.2f}"),
           ("rss-mb", "server process memory, MiB", "?" if rss is None else f"{rss / MIB:.0f}")]
    totals = [("requests", "requests", stats["requests"]),
              ("steps", "training steps (backwards)", stats["answered"].get("backward", 0)),
              ("mb-in", "MiB in", f"{stats['bytes_in'] / MIB:.2f}"),
              ("mb-out", "MiB out", f"{stats['bytes_out'] / MIB:.2f}"),
              ("errors", "errors and refusals", stats["errors"]), ("refused", "by code", refused)]
    if "handshakes_refused" in stats:  # a server with CURVE keys: what it turned away before any request
        totals += [("handshakes-refused", "handshakes refused (tries)", stats["handshakes_refused"]),
                   ("keys-refused", "distinct keys refused", stats["keys_refused"]),
                   ("without-key", "tries without a key", stats["handshakes_without_key"]),
                   ("withdrawn", "requests from withdrawn keys", stats["requests_from_withdrawn_keys"])]
    per_s = [] if rate is None else [
        ("requests-per-s", "requests / s", f"{rate['requests']:.1f}"),
        ("steps-per-s", "steps / s", f"{rate['steps']:.2f}"),
        ("mb-in-per-s", "MiB in / s", f"{rate['bytes_in'] / MIB:.2f}"),
        ("mb-out-per-s", "MiB out / s", f"{rate['bytes_out'] / MIB:.2f}"),
        ("refusals-per-s", "refusals / s", f"{rate['refusals']:.2f}")]
    columns = ("id", "mode", "requests", "trunk_steps", "states", "generations", "idle_s")
    lines = "".join("<tr class='sk-session'>" + "".join(f"<td {PAD}>{html.escape(str(s[c]))}</td>" for c in columns)
                    + "</tr>" for s in stats.get("session_list", []))
    sessions = f"<table><tr>{''.join(f'<th {PAD}>{c}</th>' for c in columns)}</tr>{lines}</table>"
    a, b = stats["cuts"]
    head = (f"<b>trunk server</b>: {html.escape(str(stats['model']))}, blocks {a}–{b - 1} on "
            f"{html.escape(str(stats['device']))}, up {stats['uptime_s']:.0f} s")
    tables = "".join(_table(title, rows) for title, rows in [("now", now), ("so far", totals), ("per second", per_s)]
                     if rows)
    return f"<div class='splitkit-view'>{head}<br>{tables}<br>{sessions}</div>"


PAD = "style='padding:0 8px'"


def _table(title: str, rows: list) -> str:
    body = "".join(f"<tr><td>{label}</td><td class='sk-{name}' style='text-align:right;padding:0 8px'>{value}</td></tr>"
                   for name, label, value in rows)
    return (f"<table style='display:inline-block;vertical-align:top;margin-right:24px'>"
            f"<tr><th colspan=2 style='text-align:left'>{title}</th></tr>{body}</table>")
