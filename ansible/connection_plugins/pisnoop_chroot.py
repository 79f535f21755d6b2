# pisnoop: run tasks inside a root file system that is not running (an image being built).
# Apache-2.0, part of pisnoop.
"""Ansible connection into a directory with chroot(8): how image/build.sh provisions the image offline.

Nothing of the target runs: no systemd, no Open vSwitch, no NetworkManager.
The playbook knows (``pisnoop_offline: true``) and only installs, writes
and enables; the first boot does the rest. A foreign architecture's root
works through binfmt_misc and qemu-user-static. ``ansible_host`` is the
directory. Files are copied straight into it.
"""

from __future__ import annotations

DOCUMENTATION = """
    name: pisnoop_chroot
    short_description: run tasks in a root directory with chroot(8)
    description:
        - Runs commands with chroot(8) in a directory (a root file system being built) and copies files
          straight into it. Needs root on the controller.
    author: pisnoop
    options:
        remote_addr:
            description: The root directory on the controller.
            default: inventory_hostname
            vars:
                - name: inventory_hostname
                - name: ansible_host
                - name: ansible_chroot_root
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
    """Commands through chroot, files copied under the root."""

    transport = "pisnoop_chroot"
    has_pipelining = True
    default_user = "root"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._root = None

    def _connect(self):
        if self._connected:
            return self
        root = os.path.abspath(str(self.get_option("remote_addr")))
        if not os.path.isfile(os.path.join(root, "bin", "sh")):
            raise AnsibleConnectionFailure(f"pisnoop_chroot: {root} is not a root file system (no bin/sh)")
        if shutil.which("chroot") is None:
            raise AnsibleConnectionFailure("pisnoop_chroot: the chroot command (coreutils) is not on the controller")
        self._root = root
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        argv = ["chroot", self._root, "/bin/sh", "-c", cmd]
        display.vvv(f"EXEC {shlex.join(argv)}", host=self._root)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
        proc = subprocess.run(argv, input=to_bytes(in_data) if in_data is not None else None,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, check=False,
                              stdin=None if in_data is not None else subprocess.DEVNULL, cwd="/")
        return proc.returncode, proc.stdout, proc.stderr

    def _inside(self, path):
        if not os.path.isabs(path):
            raise AnsibleError(f"pisnoop_chroot: remote path {path!r} is not absolute")
        return self._root + os.path.normpath(path)

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        self._connect()
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._root)
        if not os.path.exists(in_path):
            raise AnsibleFileNotFound(f"pisnoop_chroot: file to copy does not exist: {in_path}")
        try:
            shutil.copyfile(in_path, self._inside(out_path))
        except OSError as exc:
            raise AnsibleError(f"pisnoop_chroot: failed to copy {in_path} to {out_path}: {exc}") from None

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        self._connect()
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._root)
        try:
            shutil.copyfile(self._inside(in_path), out_path)
        except OSError as exc:
            raise AnsibleError(f"pisnoop_chroot: failed to fetch {in_path} to {out_path}: {exc}") from None

    def close(self):
        self._connected = False
