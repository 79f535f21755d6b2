"""The one place the Ryu API is imported from.

pisnoop runs on os-ken (the maintained Ryu fork, same API under ``os_ken``);
to run on ``ryu`` instead, change the ``_PKG`` line. os-ken 4 uses native
threads for its hub unless OSKEN_HUB_TYPE says otherwise; pisnoop pins
``native`` so that the store thread and the event loop are plain threads.

It also holds pisnoop's one fix to os-ken itself (``Datapath``, installed by
``install_datapath``): with the native hub ``hub.kill`` does nothing, so a
connection whose socket closed left ``Datapath.serve()`` joining a send
thread that waits on an empty queue forever, and the app heard of the end
only when something was sent (docs/ARCHITECTURE.md, "Facts: os-ken").
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket

_PKG = "os_ken"      # "ryu" for Ryu

log = logging.getLogger("pisnoop.controller")

os.environ["OSKEN_HUB_TYPE"] = "native"

app_manager = importlib.import_module(f"{_PKG}.base.app_manager")
cfg = importlib.import_module(f"{_PKG}.cfg")
ofp_event = importlib.import_module(f"{_PKG}.controller.ofp_event")
handler = importlib.import_module(f"{_PKG}.controller.handler")
event = importlib.import_module(f"{_PKG}.controller.event")
ofproto_v1_3 = importlib.import_module(f"{_PKG}.ofproto.ofproto_v1_3")
hub = importlib.import_module(f"{_PKG}.lib.hub")
controller = importlib.import_module(f"{_PKG}.controller.controller")

RyuApp = getattr(app_manager, "OSKenApp", None) or app_manager.RyuApp
set_ev_cls = handler.set_ev_cls
CONFIG_DISPATCHER = handler.CONFIG_DISPATCHER
MAIN_DISPATCHER = handler.MAIN_DISPATCHER
DEAD_DISPATCHER = handler.DEAD_DISPATCHER
EventBase = event.EventBase
CONF = cfg.CONF
OFP_VERSION = ofproto_v1_3.OFP_VERSION

OFPMPF_REPLY_MORE = ofproto_v1_3.OFPMPF_REPLY_MORE

# a connection that goes silent (no FIN, no RST) ends after KEEPIDLE + KEEPCNT * KEEPINTVL seconds
KEEPIDLE, KEEPINTVL, KEEPCNT = 2, 1, 3
USER_TIMEOUT_MS = 5000          # data sent and not acknowledged for this long ends the connection too


class _Socket:
    """The datapath's socket, remembering why reading from it stopped (its ``ended``)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.ended: str | None = None

    def recv(self, n: int) -> bytes:
        try:
            data = self._sock.recv(n)
        except socket.timeout:
            raise
        except OSError as exc:
            self.ended = self.ended or (exc.strerror or exc.__class__.__name__).lower()
            raise
        if not data:
            self.ended = self.ended or "closed by the switch"
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _keepalive(sock: socket.socket) -> None:
    for level, opt, value in ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPIDLE),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPINTVL),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPCNT),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), USER_TIMEOUT_MS)):
        if opt is not None:
            try:
                sock.setsockopt(level, opt, value)
            except OSError:
                pass


class Datapath(controller.Datapath):
    """os-ken's Datapath whose end is an event at once, leaving no thread and no socket behind.

    When reading stops (EOF, reset, keepalive timeout) the state goes DEAD at
    once, so the app hears of it now, with the reason in ``end_reason``; the
    send thread is woken by a closing message, so ``serve()`` returns and its
    thread ends. ``close()`` shuts both directions, so the reader wakes too."""

    def __init__(self, sock, address):
        _keepalive(sock)
        self.end_reason: str | None = None
        super().__init__(_Socket(sock), address)

    def _recv_loop(self):
        try:
            super()._recv_loop()
        finally:
            self.end_reason = self.end_reason or self.socket.ended or "closed by the controller"
            self.set_state(DEAD_DISPATCHER)
            self.send(b"", close_socket=True)          # the send thread's queue.get() returns: it ends

    def close(self, reason: str | None = None):
        """End this connection from the controller's side (``reason`` becomes ``end_reason``)."""
        self.end_reason = self.end_reason or reason
        self.set_state(DEAD_DISPATCHER)
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _serve_connection(sock, address) -> None:
    """One switch connection, start to end (what os-ken's ``datapath_connection_factory`` does, with our
    Datapath; an exception is logged here: the native hub's ``TaskExit`` is ``Exception`` and hides it)."""
    with contextlib.closing(Datapath(sock, address)) as dp:
        try:
            dp.serve()
        except Exception as exc:
            log.error("connection from %s:%s failed: %s: %s", address[0], address[1], exc.__class__.__name__, exc)


def install_datapath() -> None:
    """Make os-ken's listener serve each switch connection with pisnoop's ``Datapath``.

    os-ken's own class keeps its name (its methods call ``super(Datapath, self)``), only the
    connection factory the listener looks up at start is replaced."""
    controller.datapath_connection_factory = _serve_connection
