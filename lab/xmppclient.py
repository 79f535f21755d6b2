"""One slixmpp client: ``chat`` sends messages at a rate, ``sink`` counts what arrives.

    python -m lab.xmppclient --role chat --jid a@pisnoop.test --password P --cafile run/certs/pisnoop.test.crt \
        --server 10.0.0.1 --source 10.0.0.11 --to sink@pisnoop.test --rate 0.2 --duration 60

Always encrypted: STARTTLS (``--tls starttls``, port 5222) or TLS from the
first byte (``--tls direct``, port 5223), trusting only ``--cafile`` (the lab
server's throwaway certificate, checked against the JID's domain), never the
public CA store. ``--session-messages N`` closes the stream after N messages
and logs in again (reconnect spam).

The report file (JSON, rewritten every second) says how many messages were
sent (chat) or received per sender (sink), and whether the stream is up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import slixmpp

from .tlscert import client_context


class Client(slixmpp.ClientXMPP):
    def __init__(self, args):
        super().__init__(args.jid, args.password)
        self.ssl_context = client_context(args.cafile)     # pinned: the lab's certificate and nothing else
        direct = args.tls == "direct"
        self.enable_direct_tls, self.enable_starttls, self.enable_plaintext = direct, not direct, False
        self.args = args
        self.sent = 0
        self.send_errors = 0
        self.received: dict[str, int] = {}
        self.online = False
        self.disconnects = 0
        self.sessions = 0
        self.session_sent = 0
        self.encrypted = True
        self.stopping = False
        self.chatting = False
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("disconnected", self.on_disconnected)

    async def on_start(self, _event):
        self.send_presence()
        self.online = True
        self.sessions += 1
        self.session_sent = 0
        # the stream a session starts on is a TLS one (the server requires it): checked, not assumed
        self.encrypted = self.encrypted and self.transport.get_extra_info("sslcontext") is not None
        if self.args.role == "chat" and not self.chatting:
            self.chatting = True
            asyncio.ensure_future(self.chat_loop())

    def on_disconnected(self, _event):
        self.online = False
        self.disconnects += 1
        if self.args.session_messages and not self.stopping:
            self.connect(self.args.server, self.args.port)      # log in again: reconnect spam

    def on_message(self, msg):
        if msg["type"] in ("chat", "normal"):
            who = msg["from"].bare
            self.received[who] = self.received.get(who, 0) + 1

    async def chat_loop(self):
        interval = 1.0 / self.args.rate
        nxt = time.monotonic()
        while not self.stopping:
            nxt += interval
            if self.online:
                try:
                    self.send_message(mto=self.args.to, mbody=f"hello #{self.sent} from {self.boundjid.bare}",
                                      mtype="chat")
                    self.sent += 1
                    self.session_sent += 1
                except Exception:  # a closed transport: counted, the loop goes on
                    self.send_errors += 1
                if self.args.session_messages and self.session_sent >= self.args.session_messages:
                    self.online = False
                    self.disconnect(wait=0.5)
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    def report(self) -> dict:
        return {"jid": self.args.jid, "role": self.args.role, "online": self.online, "sent": self.sent,
                "send_errors": self.send_errors, "received": self.received, "disconnects": self.disconnects,
                "sessions": self.sessions, "encrypted": self.encrypted and self.sessions > 0, "time": time.time()}


async def _main(args) -> int:
    loop = asyncio.get_running_loop()
    if args.source:
        # slixmpp has no source-address option: bind each connection to ours
        orig = loop.create_connection

        async def create_connection(*a, **kw):
            kw.setdefault("local_addr", (args.source, 0))
            return await orig(*a, **kw)

        loop.create_connection = create_connection
    client = Client(args)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop cleanly: the final report must be exact
        loop.add_signal_handler(sig, stop.set)
    client.connect(args.server, args.port)
    report = Path(args.report) if args.report else None
    end = time.monotonic() + args.duration
    while time.monotonic() < end and not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(1.0, max(0.0, end - time.monotonic())))
        except asyncio.TimeoutError:
            pass
        if report:
            tmp = report.with_suffix(".tmp")
            tmp.write_text(json.dumps(client.report()))
            os.replace(tmp, report)
    client.stopping = True  # stop sending, let the last stanzas leave, then close the stream
    await asyncio.sleep(1.0)
    client.disconnect(wait=2.0)
    await asyncio.sleep(0.5)
    if report:
        report.write_text(json.dumps(client.report()))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.xmppclient")
    ap.add_argument("--role", choices=["chat", "sink"], required=True)
    ap.add_argument("--jid", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--server", required=True)
    ap.add_argument("--port", type=int, default=5222)
    ap.add_argument("--source")
    ap.add_argument("--to")
    ap.add_argument("--rate", type=float, default=1.0, help="messages per second (chat)")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--report")
    ap.add_argument("--cafile", required=True, type=Path, help="the server's certificate, the only one trusted")
    ap.add_argument("--tls", choices=["starttls", "direct"], default="starttls")
    ap.add_argument("--session-messages", type=int, default=0,
                    help="close the stream and log in again after this many messages (0: never)")
    args = ap.parse_args(argv)
    if args.role == "chat" and not args.to:
        ap.error("--to is required for --role chat")
    if args.rate <= 0:
        ap.error("--rate must be > 0")
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
