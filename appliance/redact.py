"""``redact``: a MongoDB URI (or any text holding one) without its password, the one way pisnoop shows a URI.

``mongodb://user:secret@db1,db2/?replicaSet=rs0`` becomes
``mongodb://user:***@db1,db2/?replicaSet=rs0``: the user stays (it says
which account), the password never reaches a log line, a status document, an
error message or ``check-config --print``. A password given as a URI option
(``password=``, pymongo does not read one, but an operator may try) and the
query's ``authMechanismProperties`` secrets are masked too. Standard library
only: ``appliance.config`` uses it in its one-line refusals.
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://user:password@hosts: the password runs from the ':' after the user to the '@' after which no other '@'
# comes before a space, a quote or the text's end (so a raw '@', '/', '?' or space in a password, a URI that is
# wrong, shown in the refusal, is masked whole; of two URIs on a line, each is masked on its own)
_USERINFO = re.compile(r"(mongodb(?:\+srv)?://)([^:/@\s'\"]*):([^\n'\"]*?)@(?=[^@\s'\"]*(?:[\s'\"]|$))",
                       re.IGNORECASE)
# options that hold a secret, masked whole (authMechanismProperties carries AWS_SESSION_TOKEN:... inside its value)
_SECRET_OPTIONS = re.compile(r"((?:^|[?&;])(?:password|tlsCertificateKeyFilePassword|AWS_SESSION_TOKEN|"
                             r"authMechanismProperties)=)[^&;\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every MongoDB URI's password (and secret options) replaced by ``***``."""
    if not isinstance(text, str):
        text = str(text)
    out = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{MASK}@", text)
    return _SECRET_OPTIONS.sub(lambda m: m.group(1) + MASK, out)
