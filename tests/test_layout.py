"""The layout holds: each command loads only its own service, and the product wheel has no lab in it.

What a command loaded is read from ``sys.modules`` of a fresh interpreter that
ran it (``python -X importtime`` misses modules loaded by ``importlib``, which
is how the CLI loads a command), so nothing a test imported earlier can hide
a stray import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from appliance import cext, pcapfile
from tests.analyser_frames import T0, Conn, steady
from tests.conftest import REPO

SERVICES = ("lab", "analyser", "static_controller", "snooper", "webui")
_RUN = """
import json, sys
from appliance.cli import main
argv = json.loads(sys.argv[1])
rc = None
if argv is not None:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
with open(sys.argv[2], "w") as fh:
    json.dump({"rc": rc, "modules": sorted({name.split(".")[0] for name in sys.modules})}, fh)
"""


def loaded_modules(argv: list[str] | None, tmp_path: Path, cwd: Path = REPO) -> tuple[set[str], int, str]:
    """(the project's service packages and os-ken/slixmpp that ``pisnoop ARGV`` loaded, its exit code, its output)."""
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PISNOOP_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(argv), str(out)], capture_output=True, text=True,
                          timeout=60, cwd=str(cwd), env=env)
    assert out.exists(), proc.stderr[-2000:]
    got = json.loads(out.read_text())
    return set(got["modules"]) & {*SERVICES, "os_ken", "slixmpp"}, got["rc"], proc.stdout + proc.stderr


def test_the_command_hub_loads_no_service(tmp_path):
    loaded, _rc, _out = loaded_modules(None, tmp_path)
    assert loaded == set()
    loaded, rc, out = loaded_modules(["--help"], tmp_path)
    assert rc == 0 and "import-pcap" in out
    assert loaded == set()


@pytest.mark.parametrize("command, own", [
    ("snooper", {"snooper"}), ("export-pcap", {"snooper"}), ("import-pcap", {"snooper"}),
    ("controller", {"static_controller"}),
    ("analyser", {"analyser"}), ("analyse", {"analyser"}), ("report", {"analyser"}), ("flags", {"analyser"}),
    ("check-config", set()), ("web", {"webui"}),
])
def test_help_of_each_command_loads_only_its_service(command, own, tmp_path):
    loaded, rc, out = loaded_modules([command, "--help"], tmp_path)
    assert rc == 0, out[-500:]
    assert loaded == own


def _bad_interface_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "pisnoop.yaml"
    cfg.write_text("snooper:\n  interface: psnone0\n")
    return cfg


def test_running_each_service_loads_no_other_service(tmp_path):
    """The run paths, not only --help: each gets past its config into its own package."""
    cfg = str(_bad_interface_config(tmp_path))
    loaded, rc, out = loaded_modules(["--config", cfg, "snooper"], tmp_path)
    assert rc == 2 and "psnone0" in out, out[-500:]
    assert loaded == {"snooper"}

    loaded, rc, out = loaded_modules(["--config", cfg, "controller", "--check"], tmp_path)
    assert rc == 0 and "plan fits ovs" in out, out[-500:]
    assert loaded == {"static_controller"}

    pcap = tmp_path / "one.pcap"
    frames = steady(Conn("10.0.0.10", 40000), T0, 60, 5)
    with open(pcap, "wb") as fh:
        writer = pcapfile.Writer(fh)
        for frame in frames:
            writer.write(*frame)
    loaded, rc, out = loaded_modules(["analyse", "--pcap", str(pcap), "--json"], tmp_path, cwd=tmp_path)
    assert rc == 0, out[-500:]
    assert loaded == {"analyser"}
    assert len(frames) > 3  # the pass read real traffic: it had something to load its parser for


@pytest.fixture(scope="module")
def product_wheel(tmp_path_factory) -> Path:
    """Built pure from a copy of the checkout (as the playbook does), so no build/ folder is left in it."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                           str(src)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PISNOOP_PURE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("pisnoop-*.whl")
    return wheel


def test_the_product_wheel_holds_no_lab(product_wheel):
    names = zipfile.ZipFile(product_wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"appliance", "analyser", "snooper", "static_controller", "webui"}
    assert "appliance/pisnoop.example.yaml" in names
    assert {"webui/static/app.js", "webui/static/uPlot.iife.min.js", "webui/static/uPlot.LICENSE"} <= set(names)
    assert {src for sources, _ in cext.EXTENSIONS.values() for src in sources} <= set(names)   # compiled on the Pi
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(product_wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [r for r in requires if "slixmpp" in r or "nx-27017" in r]


def test_without_the_lab_the_cli_works_and_demo_says_what_to_install(product_wheel, tmp_path):
    """The wheel alone (its dependencies from this venv's site-packages, no editable lab): as on a Pi."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(product_wheel)], check=True, capture_output=True, timeout=300)
    # -S: no site processing, so the checkout's editable finders (.pth) are not installed; the
    # third-party packages come from site-packages on PYTHONPATH. cwd is empty: no checkout on sys.path.
    env = {"PYTHONPATH": f"{target}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    run = [sys.executable, "-S", "-m", "appliance.cli"]
    probe = subprocess.run([*run[:2], "-c", "import lab"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert probe.returncode != 0 and "No module named 'lab'" in probe.stderr
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert helped.returncode == 0 and "snooper" in helped.stdout, helped.stderr
    for command in (["demo"], ["virtual", "status"]):
        proc = subprocess.run([*run, *command], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install ./lab" in lines[0], proc.stderr
    checked = subprocess.run([*run, "check-config", str(REPO / "appliance" / "pisnoop.example.yaml")],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert checked.returncode == 0, checked.stderr


def test_a_span_after_a_time_option_is_its_value():
    from appliance.cli import attach_spans
    assert attach_spans(["export-pcap", "--since", "-30m", "--until", "-1.5h", "-o", "-"]) == \
        ["export-pcap", "--since=-30m", "--until=-1.5h", "-o", "-"]
    assert attach_spans(["--since", "-o"]) == ["--since", "-o"]          # not a span: argparse says what is wrong
    assert attach_spans(["report", "--top", "-30m"]) == ["report", "--top", "-30m"]
