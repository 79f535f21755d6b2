"""Custom classifiers: Python files in the directory the policy names.

Each file holds one or more classes with a ``classify(self, ctx)`` method; the
analyser creates each class once (no arguments) and calls ``classify`` for
every packet with a ``FlowContext``. It returns None, a reason string, a dict
(keys of ``Verdict``) or a ``Verdict``; the client of the flow is filled in
when the verdict does not name one. ``scope = "ip"`` (class attribute or
verdict key) flags the whole client IP instead of the connection.

A custom classifier sees verified TCP and UDP packets only (``protocol =
"tcp"`` or ``"udp"`` narrows it to one), so its verdicts can always be
enforced: the flag bans the flow's protocol and server port, ``direction``
(``outbound``, the default: the client is on the inside; or ``inbound``)
says which side the client is on. The policy refuses at load a class whose
``scope``, ``protocol`` or ``direction`` enforce could not apply
(analyser/policy.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Optional

from ..parse import TCP, UDP
from ..parse import payload as _payload
from . import Classifier, Verdict

log = logging.getLogger("pisnoop.analyser")


class FlowContext:
    """What a custom classifier sees: the packet, its direction and its flow so far."""

    __slots__ = ("packet", "flow", "direction", "ref")

    def __init__(self, packet, flow, direction, ref):
        self.packet, self.flow, self.direction, self.ref = packet, flow, direction, ref

    client_ip = property(lambda s: s.flow.client)
    client_port = property(lambda s: s.flow.cport)
    server_ip = property(lambda s: s.flow.server)
    server_port = property(lambda s: s.flow.sport)
    proto = property(lambda s: s.flow.proto)
    verified = property(lambda s: True)            # only verified packets reach a classifier
    ts_ns = property(lambda s: s.packet.ts_ns)
    size = property(lambda s: s.packet.wire_len)
    tcp_flags = property(lambda s: s.packet.tcp_flags)
    packets = property(lambda s: {"c2s": s.flow.pkts[0], "s2c": s.flow.pkts[1]})
    bytes = property(lambda s: {"c2s": s.flow.bytes[0], "s2c": s.flow.bytes[1]})
    first_ns = property(lambda s: s.flow.first_ns)
    flag_counts = property(lambda s: dict(s.flow.flags))
    to_server = property(lambda s: s.direction == 0)

    @property
    def payload(self) -> bytes:
        return _payload(self.packet)

    @property
    def frame_id(self) -> str:
        return self.ref if isinstance(self.ref, str) else f"{self.ref[0]}#{self.ref[1]}"


class CustomClassifier(Classifier):
    """Adapts a user class to the analyser: context in, ``Verdict`` out, errors counted not raised."""

    def __init__(self, instance, name: str, action: Optional[str] = None):
        self.instance, self.name = instance, name
        self.action = getattr(instance, "action", None) or action
        self.scope = getattr(instance, "scope", "connection")
        self.protocol = getattr(instance, "protocol", None)
        self.direction = getattr(instance, "direction", None) or "outbound"
        self.protos = {"tcp": (TCP,), "udp": (UDP,)}.get(self.protocol, (TCP, UDP))
        self.errors = 0

    def packet(self, p, flow, direction, ref):
        if flow.proto not in self.protos:
            return None
        ctx = FlowContext(p, flow, direction, ref)
        try:
            out = self.instance.classify(ctx)
        except Exception as exc:  # a user's bug must not stop the analyser
            self.errors += 1
            if self.errors <= 3:
                log.warning("custom classifier %s raised %s: %s", self.name, exc.__class__.__name__, exc)
            return None
        if out is None or out is False:
            return None
        scope = self.scope
        if isinstance(out, str):
            out = Verdict(reason=out)
        elif isinstance(out, dict):
            scope = out.get("scope", scope)
            known = {k: v for k, v in out.items() if k in Verdict.__dataclass_fields__}
            out = Verdict(**{"reason": f"custom classifier {self.name}", **known})
        if not isinstance(out, Verdict):
            return None
        if out.client_ip is None:
            out.client_ip = flow.client
        if out.client_port is None and scope != "ip":
            out.client_port = flow.cport
        if out.server_port is None and not out.server_ports:
            out.server_port = flow.sport
        if out.protocol is None:
            out.protocol = "udp" if flow.proto == UDP else "tcp"
        if out.direction is None:
            out.direction = self.direction
        out.evidence = {"first_packet_ns": flow.first_ns, "last_packet_ns": p.ts_ns,
                        "samples": [ctx.frame_id], **(out.evidence or {})}
        return out


class LoadError(Exception):
    """A custom classifier file that cannot be used: (file, what is wrong)."""


def load_dir(directory: Path) -> list[tuple[str, type]]:
    """(name, class) for every classifier class in ``directory/*.py``, sorted by file."""
    found = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        mod_name = f"pisnoop_custom_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise LoadError(str(path), f"a loadable Python file ({exc.__class__.__name__}: {exc})") from None
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if c.__module__ == mod_name and callable(getattr(c, "classify", None))]
        if not classes:
            raise LoadError(str(path), "a class with a classify(self, ctx) method")
        for cls in classes:
            found.append((getattr(cls, "name", None) or cls.__name__, cls))
    return found
