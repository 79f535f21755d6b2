"""The lab: a virtual appliance in network namespaces, the demo and what tests drive.

Not part of the product: the Pi runs the services under systemd and never
imports this package. It is its own distribution (``lab/pyproject.toml``,
``pisnoop-lab``) so that the wheel the Pi installs carries none of it, nor
its extra dependencies (nx-27017, slixmpp).
"""
