"""The buttons: ``pisnoop flags release | ban | allow``, run through ``analyser.flag_commands`` itself.

The page's button builds the same arguments the command line would and
calls the command's function, so a flag released here is released exactly as
``pisnoop flags release ID`` releases it (the flag document, the alert). The
command prints its result; that text (and its exit code) is what the page
shows. The commands print to ``sys.stdout``, so one runs at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import threading
from dataclasses import dataclass

from appliance.errors import BadInput, Failure

_ONE_AT_A_TIME = threading.Lock()


@dataclass(frozen=True)
class Outcome:
    code: int          # the command's exit code (0 done, 1 nothing done or the store away, 2 refused)
    text: str


def _run(config_path: str, db, func, **fields) -> Outcome:
    """``func`` (a ``pisnoop flags`` command) over the dashboard's own database ``db``: a click opens no client."""
    args = argparse.Namespace(config=config_path, db=db, **fields)
    out, err = io.StringIO(), io.StringIO()
    with _ONE_AT_A_TIME, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = int(func(args) or 0)
        except BadInput as exc:
            return Outcome(2, str(exc))
        except Failure as exc:
            return Outcome(1, str(exc))
    text = (out.getvalue() + err.getvalue()).strip().removeprefix("pisnoop: ")
    return Outcome(code, text)


def release(config_path: str, db, flag_id: str) -> Outcome:
    from analyser import flag_commands
    return _run(config_path, db, flag_commands.cmd_release, target=flag_id)


def ban(config_path: str, db, subject: str, duration: str | None, reason: str) -> Outcome:
    from analyser import flag_commands
    return _run(config_path, db, flag_commands.cmd_ban, subject=subject, port=None, protocol="tcp", inbound=False,
                duration=duration or None, action=None, reason=reason or "banned from the dashboard")


def allow(config_path: str, db, network: str, reason: str) -> Outcome:
    """Never ban ``network`` at this sensor only (``flags allow --local``: its text says "on SENSOR only")."""
    from analyser import flag_commands
    return _run(config_path, db, flag_commands.cmd_allow, network=network,
                reason=reason or "allowed from the dashboard", list=False, remove=None, local=True)
