"""The C fast paths, listed once: ``setup.py`` builds them, and so does the appliance in place.

Each entry is ``module: (sources, libraries)``; adding an extension is one entry. Every module here has
a pure-Python fallback that its package picks when the extension is missing. The playbook builds the
product wheel pure (``PISNOOP_PURE=1``: the control node may be another architecture than the Pi) and
then compiles these on the Pi with ``python -m appliance.cext DIR`` (DIR: where the packages are installed).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

EXTENSIONS: dict[str, tuple[list[str], list[str]]] = {
    "snooper._fastcap": (["snooper/_fastcap.c"], ["xxhash"]),
    "analyser._fastread": (["analyser/_fastread.c"], []),
}
CFLAGS = ["-O2", "-std=c11", "-Wall"]


def build_in_place(root: Path, cc: str = "gcc") -> list[Path]:
    """Compile every extension from the sources under ``root`` into ``root``; the shared objects made."""
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    made = []
    for module, (sources, libraries) in EXTENSIONS.items():
        out = root / (module.replace(".", "/") + suffix)
        argv = [cc, *CFLAGS, "-shared", "-fPIC", f"-I{include}", *(str(root / s) for s in sources),
                "-o", str(out), *(f"-l{lib}" for lib in libraries)]
        subprocess.run(argv, check=True)
        made.append(out)
    return made


if __name__ == "__main__":
    for path in build_in_place(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)):
        print(path)
