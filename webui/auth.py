"""Passwords (stored salted and hashed, standard library only), sessions that expire, CSRF tokens.

``web.password_hash`` is ``scrypt$LOG2N$R$P$SALT$HASH`` (what ``pisnoop web
--hash-password`` writes) or ``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (hex
fields; ``appliance.config.PASSWORD_HASH`` is the shape the config accepts).
Sessions live in the service's memory: a restart logs everyone out, which is
what an appliance with one operator wants. Each session carries its own CSRF
token; every form posts it back and a request without it is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

SCRYPT_LOG2N, SCRYPT_R, SCRYPT_P = 15, 8, 1      # 32 MiB and ~0.1 s on a Pi 4: fine for one login
SCRYPT_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << SCRYPT_LOG2N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_LOG2N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` hashes to ``stored`` (compared in constant time); False for any other input."""
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            log2n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, want = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
            got = hashlib.scrypt(password.encode(), salt=salt, n=1 << log2n, r=r, p=p,
                                 maxmem=max(SCRYPT_MAXMEM, 256 * r * (1 << log2n)), dklen=len(want))
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            salt, want = bytes.fromhex(parts[2]), bytes.fromhex(parts[3])
            got = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, int(parts[1]), dklen=len(want))
        else:
            return False
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, want)


@dataclass
class Session:
    token: str
    csrf: str
    expires: float          # time.monotonic() at which it ends, whatever is done meanwhile
    flash: str = ""         # the last button's result, shown once on the next page


class Sessions:
    """Session tokens (random, 256 bits) to their CSRF token; each ends ``lifetime`` seconds after the login."""

    def __init__(self, lifetime: float, clock=time.monotonic):
        self.lifetime = lifetime
        self.clock = clock
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(self) -> Session:
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), self.clock() + self.lifetime)
        with self._lock:
            self._prune()
            self._by_token[s.token] = s
        return s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            s = self._by_token.get(token)
            if s is not None and s.expires <= self.clock():
                del self._by_token[token]
                return None
            return s

    def end(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)

    def _prune(self) -> None:
        now = self.clock()
        for t in [t for t, s in self._by_token.items() if s.expires <= now]:
            del self._by_token[t]


def same(a: str | None, b: str | None) -> bool:
    """Two tokens equal, compared in constant time; a missing one never matches."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
