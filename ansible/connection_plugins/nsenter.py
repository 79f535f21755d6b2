# pisnoop: run tasks inside a booted container (systemd-nspawn -b) by entering its namespaces.
# Apache-2.0, part of pisnoop.
"""Ansible connection into a running container through nsenter(1).

A booted systemd-nspawn container has its own mount, PID, UTS, IPC and
network namespaces; ``chroot`` would run modules beside it (systemctl would
not reach the container's systemd). This plugin enters every namespace of
the container's PID 1 instead, so tasks see exactly what the container sees.
``ansible_host`` is that PID (as printed by ``machinectl show -p Leader`` or
taken from /proc). Files are copied through ``/proc/PID/root``.
"""

from __future__ import annotations

DOCUMENTATION = """
    name: nsenter
    short_description: run tasks inside the namespaces of a running container
    description:
        - Runs commands with nsenter(1) in every namespace of a process (the container's PID 1)
          and copies files through /proc/PID/root. Needs root on the controller.
    author: pisnoop
    options:
        remote_addr:
            description: PID of the container's init process on the controller.
            default: inventory_hostname
            vars:
                - name: inventory_hostname
                - name: ansible_host
                - name: ansible_nsenter_pid
    extends_documentation_fragment:
        - connection_pipelining
"""

import os
import shlex
import shutil
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()


class Connection(ConnectionBase):
    """Commands through nsenter, files through /proc/PID/root."""

    transport = "nsenter"
    has_pipelining = True
    default_user = "root"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pid = None

    def _connect(self):
        if self._connected:
            return self
        value = str(self.get_option("remote_addr")).strip()
        if not value.isdigit():
            raise AnsibleConnectionFailure("nsenter: ansible_host must be the PID of the container's init, "
                                           f"got {value!r}")
        if not os.path.isdir(f"/proc/{value}"):
            raise AnsibleConnectionFailure(f"nsenter: no process {value} (is the container running?)")
        if shutil.which("nsenter") is None:
            raise AnsibleConnectionFailure("nsenter: the nsenter command (util-linux) is not installed "
                                           "on the controller")
        self._pid = value
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        argv = ["nsenter", "--target", self._pid, "--mount", "--uts", "--ipc", "--net", "--pid",
                "--root", "--wdns=/", "--", "/bin/sh", "-c", cmd]
        display.vvv(f"EXEC {shlex.join(argv)}", host=self._pid)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": "/root"}
        proc = subprocess.run(argv, input=to_bytes(in_data) if in_data is not None else None,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, check=False,
                              stdin=None if in_data is not None else subprocess.DEVNULL)
        return proc.returncode, proc.stdout, proc.stderr

    def _inside(self, path):
        if not os.path.isabs(path):
            raise AnsibleError(f"nsenter: remote path {path!r} is not absolute")
        return f"/proc/{self._pid}/root{os.path.normpath(path)}"

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        self._connect()
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._pid)
        if not os.path.exists(in_path):
            raise AnsibleFileNotFound(f"nsenter: file to copy does not exist: {in_path}")
        try:
            shutil.copyfile(in_path, self._inside(out_path))
        except OSError as exc:
            raise AnsibleError(f"nsenter: failed to copy {in_path} to {out_path}: {exc}") from None

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        self._connect()
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._pid)
        try:
            shutil.copyfile(self._inside(in_path), out_path)
        except OSError as exc:
            raise AnsibleError(f"nsenter: failed to fetch {in_path} to {out_path}: {exc}") from None

    def close(self):
        self._connected = False
