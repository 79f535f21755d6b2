"""The C extensions (the list is appliance/cext.py); everything else is in pyproject.toml.

PISNOOP_PURE=1 builds a pure wheel (the playbook's, compiled on the appliance itself).
"""

import os
import sys

from setuptools import Extension, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from appliance.cext import CFLAGS, EXTENSIONS  # noqa: E402

pure = os.environ.get("PISNOOP_PURE", "") not in ("", "0")
setup(ext_modules=[] if pure else [Extension(name, sources, libraries=libs, extra_compile_args=CFLAGS)
                                   for name, (sources, libs) in EXTENSIONS.items()])
