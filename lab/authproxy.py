"""A SCRAM front for the embedded store: MongoDB's password check, which nx-27017 does not have.

nx-27017 answers ``saslStart`` without a ``payload`` (pymongo then fails with
a ``KeyError``), so a ``mongodb.uri`` with credentials cannot be shown working
against it. This proxy listens on 127.0.0.1, answers the SCRAM-SHA-1 and
SCRAM-SHA-256 conversations (RFC 5802, RFC 7677; SHA-1 over MongoDB's
``md5("user:mongo:password")`` digest, as a real server stores it) for one
user, refuses every other command of a connection that has not authenticated
(code 13, Unauthorized, as MongoDB does) and forwards the rest, byte for byte,
to the store. It never sees the password on the wire (SCRAM sends a proof).
Not the product: the lab's model of what only a real MongoDB with
``security.authorization`` shows (docs/FLEET.md, "Authentication").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import socket
import struct
import threading

import bson

from .procs import free_port

log = logging.getLogger("pisnoop.lab.authproxy")

OP_MSG = 2013
MORE_TO_COME = 1 << 1
ITERATIONS = {"SCRAM-SHA-1": 10000, "SCRAM-SHA-256": 15000}
OPEN = {"hello", "ismaster", "ping", "buildinfo", "saslstart", "saslcontinue", "endsessions"}


def _recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _read_message(sock: socket.socket) -> bytes:
    head = _recv(sock, 16)
    (length,) = struct.unpack_from("<i", head)
    return head + _recv(sock, length - 16)


def _command(msg: bytes):
    """The OP_MSG's body document (section kind 0), its request id and flags; None for any other message."""
    _length, request_id, _to, opcode = struct.unpack_from("<iiii", msg)
    if opcode != OP_MSG or msg[20] != 0:
        return None
    (flags,) = struct.unpack_from("<I", msg, 16)
    (size,) = struct.unpack_from("<i", msg, 21)
    return bson.decode(msg[21:21 + size]), request_id, flags


def _reply(request_id: int, doc: dict) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id + 1, request_id, OP_MSG) + body


class Scram:
    """One user's server-side SCRAM keys for both mechanisms (a real server keeps only these, not the password)."""

    def __init__(self, user: str, password: str):
        self.user = user
        self.keys = {}
        for mech, digest in (("SCRAM-SHA-1", "sha1"), ("SCRAM-SHA-256", "sha256")):
            data = (hashlib.md5(f"{user}:mongo:{password}".encode()).hexdigest()    # noqa: S324 (MongoDB's)
                    if digest == "sha1" else password).encode()
            salt = os.urandom(16)
            salted = hashlib.pbkdf2_hmac(digest, data, salt, ITERATIONS[mech])
            client_key = hmac.new(salted, b"Client Key", digest).digest()
            self.keys[mech] = (digest, salt, hashlib.new(digest, client_key).digest(),
                               hmac.new(salted, b"Server Key", digest).digest())


class AuthProxy:
    """``with AuthProxy(store_port, user, password) as p:`` then ``p.uri(password)`` names it."""

    def __init__(self, upstream_port: int, user: str, password: str, host: str = "127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.host, self.port = host, free_port(host)
        self.scram = Scram(user, password)
        self.user = user
        self.accepted = self.refused = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()

    def uri(self, password: str, user: str | None = None) -> str:
        return f"mongodb://{user or self.user}:{password}@{self.host}:{self.port}/?authSource=admin"

    def start(self) -> "AuthProxy":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        s.settimeout(0.2)
        self._sock = s
        threading.Thread(target=self._accept, name="pisnoop-authproxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> "AuthProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        up = socket.create_connection(self.upstream)
        state: dict = {"authed": False}
        try:
            while not self._stop.is_set():
                msg = _read_message(conn)
                parsed = _command(msg)
                if parsed is not None:
                    doc, rid, flags = parsed
                    name = next(iter(doc), "").lower()
                    if name in ("saslstart", "saslcontinue"):
                        conn.sendall(_reply(rid, self._sasl(name, doc, state)))
                        continue
                    if not state["authed"] and name not in OPEN:
                        conn.sendall(_reply(rid, {"ok": 0, "code": 13, "codeName": "Unauthorized",
                                                  "errmsg": f"command {name} requires authentication"}))
                        continue
                up.sendall(msg)
                if parsed is not None and parsed[2] & MORE_TO_COME:
                    continue
                conn.sendall(_read_message(up))
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            up.close()

    def _sasl(self, name: str, doc: dict, state: dict) -> dict:
        """One step of the conversation: server-first for saslStart, server-final (or a refusal) for saslContinue."""
        fail = {"ok": 0, "code": 18, "codeName": "AuthenticationFailed", "errmsg": "Authentication failed."}
        payload = bytes(doc.get("payload", b""))
        if name == "saslstart":
            mech = doc.get("mechanism")
            if mech not in self.scram.keys or not payload.startswith(b"n,,"):
                return fail
            bare = payload[3:]
            fields = dict(f.split(b"=", 1) for f in bare.split(b","))
            digest, salt, _stored, _server = self.scram.keys[mech]
            nonce = fields[b"r"] + base64.b64encode(os.urandom(18))
            first = b"r=" + nonce + b",s=" + base64.b64encode(salt) + b",i=" + str(ITERATIONS[mech]).encode()
            state.update(mech=mech, bare=bare, first=first, nonce=nonce, user=fields.get(b"n", b"").decode())
            return {"ok": 1, "conversationId": 1, "done": False, "payload": first}
        if "first" not in state:
            return fail
        digest, _salt, stored, server = self.scram.keys[state["mech"]]
        fields = dict(f.split(b"=", 1) for f in payload.split(b","))
        without_proof = payload.rsplit(b",p=", 1)[0]
        auth_msg = b",".join((state["bare"], state["first"], without_proof))
        proof = base64.b64decode(fields.get(b"p", b""))
        signature = hmac.new(stored, auth_msg, digest).digest()
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        ok = (state["user"] == self.user and fields.get(b"r") == state["nonce"] and len(proof) == len(signature)
              and hmac.compare_digest(hashlib.new(digest, client_key).digest(), stored))
        state.pop("first")
        if not ok:
            self.refused += 1
            log.warning("authentication failed for user %s", state["user"])
            return fail
        self.accepted += 1
        state["authed"] = True
        v = b"v=" + base64.b64encode(hmac.new(server, auth_msg, digest).digest())
        return {"ok": 1, "conversationId": 1, "done": True, "payload": v}
