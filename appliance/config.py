"""The one configuration object every pisnoop component receives.

The YAML file is turned into frozen dataclasses and checked in one pass, so a
bad file is refused before anything touches the switch, the wire or the store.
Every refusal names the file, the key path, the bad value and what was
expected, in one line (``ConfigError``), because that is what a person reading
a journal at 3 a.m. needs.

The schema *is* the dataclasses below: a field's type says what is accepted,
its ``metadata`` says the range or the choices, its default is the default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import BadInput
from .redact import redact

DEFAULT_PATH = Path("/etc/pisnoop/pisnoop.yaml")
ENV_VAR = "PISNOOP_CONFIG"
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
# the stored forms of web.password_hash (webui/auth.py writes and checks them)
PASSWORD_HASH = re.compile(r"^(scrypt\$(1[4-9]|20)\$[1-9][0-9]?\$[1-9]\$|pbkdf2_sha256\$[1-9][0-9]{5,6}\$)"
                           r"[0-9a-f]{32,64}\$[0-9a-f]{64}$")


class ConfigError(BadInput):
    """A configuration that cannot be used; ``str()`` is the one-line message."""

    def __init__(self, source: str, key: str, value: Any, expected: str):
        self.source, self.key, self.value, self.expected = source, key, value, expected
        shown = "(missing)" if value is _MISSING else redact(repr(value))    # a URI's password is never shown
        if len(shown) > 80:
            shown = shown[:77] + "..."
        key_part = f"{key}: " if key else ""
        super().__init__(f"{source}: {key_part}got {shown}; expected {expected}")


_MISSING = object()


def value_range(lo: float | None = None, hi: float | None = None, what: str = "") -> dict:
    """Field metadata: the accepted range and how to say it (also used by the analyser's policy schema)."""
    return {"min": lo, "max": hi, "what": what}


def port_range(what: str = "a TCP port") -> dict:
    return value_range(1, 65535, f"{what} from 1 to 65535")


def _ofport() -> dict:
    return value_range(1, 0xFFFFFF00, "an OpenFlow port number from 1 to 4294967040")


# --- the schema --------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    inside: int = field(default=1, metadata=_ofport())
    mirror: int = field(default=2, metadata=_ofport())
    upstream: int = field(default=3, metadata=_ofport())
    management: Optional[int] = field(default=None, metadata=_ofport())


@dataclass(frozen=True)
class Controller:
    listen_host: str = field(default="127.0.0.1", metadata={"check": "ip"})
    listen_port: int = field(default=6653, metadata=port_range())
    max_backoff_ms: int = field(default=1000, metadata=value_range(100, 60000, "milliseconds from 100 to 60000"))


@dataclass(frozen=True)
class Switch:
    target: Literal["ovs", "zodiacfx"] = "ovs"
    datapath_id: int = field(default=0x1, metadata={
        **value_range(1, 2**64 - 1, "a datapath id from 1 to 2^64-1 (int or '0x...' string)"), "hex": True})
    bridge: str = field(default="ovsbr0", metadata={"check": "ifname"})
    forwarding: Literal["static", "l2switch"] = "static"
    ports: Ports = field(default_factory=Ports)
    controller: Controller = field(default_factory=Controller)


@dataclass(frozen=True)
class MirrorFilter:
    ip_proto: Optional[Literal["tcp", "udp"]] = None
    l4_port: Optional[int] = field(default=None, metadata=port_range("a TCP/UDP port"))


@dataclass(frozen=True)
class Mirror:
    enabled: bool = True
    filter: MirrorFilter = field(default_factory=MirrorFilter)


@dataclass(frozen=True)
class Meter:
    rate: int = field(default=1000, metadata=value_range(1, 10_000_000, "a rate from 1 to 10000000"))
    unit: Literal["pktps", "kbps"] = "pktps"
    burst: int = field(default=0, metadata=value_range(0, 10_000_000, "a burst size from 0 (none) to 10000000"))


@dataclass(frozen=True)
class Xmpp:
    server_ports: tuple[int, ...] = field(default=(5222,), metadata={
        **port_range("a TCP port"), "items": (1, 8), "unique": True})
    threshold_ppm: int = field(default=100,
                               metadata=value_range(1, 10_000_000, "packets per minute from 1 to 10000000"))
    per_ip_threshold_ppm: int = field(default=300,
                                      metadata=value_range(1, 10_000_000, "packets per minute from 1 to 10000000"))
    # a host on the inside segment (one MAC, all its addresses) and a prefix behind a router (analyser/neighbours.py)
    per_host_threshold_ppm: int = field(default=600,
                                        metadata=value_range(1, 10_000_000, "packets per minute from 1 to 10000000"))
    per_prefix_threshold_ppm: int = field(default=1200, metadata=value_range(
        1, 10_000_000, "packets per minute from 1 to 10000000"))
    prefix_length_v6: int = field(default=64, metadata=value_range(32, 128, "a prefix length from 32 to 128 "
                                                                   "(128: no prefix aggregation)"))
    prefix_length_v4: int = field(default=32, metadata=value_range(16, 32, "a prefix length from 16 to 32 "
                                                                   "(32: no prefix aggregation)"))
    # what a new verified connection costs the server (TLS, authentication, roster), in packets: reconnect spam
    connection_cost: int = field(default=10, metadata=value_range(0, 1000, "packets from 0 to 1000"))
    # a verified handshake counts after this long without the real ends contradicting it: > the server's RTT
    settle_seconds: float = field(default=0.5, metadata=value_range(0.05, 30, "seconds from 0.05 to 30"))
    lan_prefixes: tuple[str, ...] = field(default=(), metadata={"check": "ipnet", "items": (0, 64), "unique": True})
    routers: tuple[str, ...] = field(default=(), metadata={"check": "mac", "items": (0, 64), "unique": True})
    window_seconds: float = field(default=60.0, metadata=value_range(1, 3600, "seconds from 1 to 3600"))
    meter: Meter = field(default_factory=Meter)
    penalty_meter: Meter = field(default_factory=lambda: Meter(rate=10, unit="pktps"))


@dataclass(frozen=True)
class Escalation:
    factor: float = field(default=2.0, metadata=value_range(1.0, 100.0, "a factor from 1.0 (no escalation) to 100"))
    max_seconds: int = field(default=86400, metadata=value_range(1, 31_536_000, "seconds from 1 to 31536000"))
    memory_seconds: int = field(default=86400, metadata=value_range(
        1, 31_536_000, "seconds from 1 to 31536000 (how long an offence counts as previous)"))


@dataclass(frozen=True)
class Enforce:
    action: Literal["drop", "limit"] = "drop"
    ban_seconds: int = field(default=300, metadata=value_range(1, 31_536_000, "seconds from 1 to 31536000"))
    poll_interval: float = field(default=0.5, metadata=value_range(0.05, 60, "seconds from 0.05 to 60"))
    escalation: Escalation = field(default_factory=Escalation)
    never_ban: tuple[str, ...] = field(default=(), metadata={"check": "ipnet", "items": (0, 256), "unique": True})
    never_ban_servers: bool = True     # the XMPP server addresses the analyser has seen answering
    never_ban_self: bool = True        # the controller's listen address and this machine's own addresses


@dataclass(frozen=True)
class FlowstatsIds:
    enabled: bool = False
    threshold_ppm: int = field(default=100,
                               metadata=value_range(1, 10_000_000, "packets per minute from 1 to 10000000"))
    poll_interval: float = field(default=10.0, metadata=value_range(0.5, 3600, "seconds from 0.5 to 3600"))
    idle_timeout: int = field(default=60, metadata=value_range(1, 65535, "seconds from 1 to 65535"))
    hard_timeout: int = field(default=300, metadata=value_range(1, 65535, "seconds from 1 to 65535"))
    drop_seconds: int = field(default=300, metadata=value_range(1, 65535, "seconds from 1 to 65535"))


@dataclass(frozen=True)
class Snooper:
    interface: str = field(default="mirror0", metadata={"check": "ifname"})
    netns: Optional[str] = field(default=None, metadata={"check": "netns"})
    sensor: str = field(default="pisnoop", metadata={"check": "name"})
    dedupe_window: float = field(default=2.0, metadata=value_range(0, 600, "seconds from 0 (off) to 600"))
    batch_size: int = field(default=1000, metadata=value_range(1, 100_000, "frames per batch from 1 to 100000"))
    batch_interval: float = field(default=0.5, metadata=value_range(0.01, 60, "seconds from 0.01 to 60"))
    snaplen: int = field(default=65535, metadata=value_range(64, 262144, "bytes from 64 to 262144"))
    bpf_filter: str = ""
    ring_block_size: int = field(default=1 << 20,
                                 metadata={**value_range(4096, 1 << 28, "a power of two from 4096 to 268435456"),
                                           "pow2": True})
    ring_block_count: int = field(default=64, metadata=value_range(2, 65536, "blocks from 2 to 65536"))
    ring_block_timeout_ms: int = field(default=50, metadata=value_range(1, 10000, "milliseconds from 1 to 10000"))
    spool_dir: str = field(default="/var/lib/pisnoop/spool", metadata={"check": "abspath"})
    spool_max_mb: int = field(default=512, metadata=value_range(1, 1_048_576, "megabytes from 1 to 1048576"))
    spool_full_policy: Literal["drop_newest", "drop_oldest"] = "drop_newest"
    status_interval: float = field(default=5.0, metadata=value_range(0.1, 3600, "seconds from 0.1 to 3600"))


@dataclass(frozen=True)
class Retention:
    """Age (TTL indexes, appliance/indexes.py) and size (the snooper's trimming, appliance/retention.py).

    The size defaults fit a 32 GB SD card holding the OS and a local store: frames up to 8 GB, and at
    least 2 GB left free on the store's file system; flows and flags are kept longer than frames.
    """
    frames_hours: float = field(default=168.0, metadata=value_range(0, 87600, "hours from 0 (keep forever) to 87600"))
    flows_hours: float = field(default=720.0, metadata=value_range(0, 87600, "hours from 0 (keep forever) to 87600"))
    flags_days: float = field(default=90.0, metadata=value_range(
        0, 36500, "days after a flag's end from 0 (keep forever) to 36500"))
    status_hours: float = field(default=168.0, metadata=value_range(
        0, 87600, "hours after a component's last status from 0 (keep forever) to 87600"))
    frames_max_gb: float = field(default=8.0, metadata=value_range(
        0, 1_000_000, "gigabytes (10^9 bytes) of frames from 0 (no cap) to 1000000"))
    min_free_gb: float = field(default=2.0, metadata=value_range(
        0, 1_000_000, "gigabytes (10^9 bytes) left free on the store's file system from 0 (no floor) to 1000000"))


@dataclass(frozen=True)
class MongoDB:
    uri: str = field(default="mongodb://127.0.0.1:27017", metadata={"check": "mongo_uri"})
    database: str = field(default="pisnoop", metadata={"check": "name"})
    timeout_ms: int = field(default=2000, metadata=value_range(100, 120_000, "milliseconds from 100 to 120000"))
    # the store's data directory when it is on this machine (pisnoop-store: /var/lib/pisnoop-store): the free-space
    # floor reads its file system; null: the file system the store reports (dbStats fsTotalSize - fsUsedSize)
    data_dir: Optional[str] = field(default=None, metadata={"check": "abspath"})
    retention: Retention = field(default_factory=Retention)
    # where the analyser reads frames from in a replica set (appliance/store.py frames_reader); the controller
    # reads flags from the primary and every write goes to the primary whatever this says
    read_preference: Literal["primary", "primaryPreferred", "secondaryPreferred", "secondary", "nearest"] = "primary"


@dataclass(frozen=True)
class Analyser:
    policy_file: Optional[str] = field(default=None, metadata={"check": "abspath"})
    poll_interval: float = field(default=0.5, metadata=value_range(0.05, 60, "seconds from 0.05 to 60"))
    status_interval: float = field(default=5.0, metadata=value_range(0.1, 3600, "seconds from 0.1 to 3600"))
    report_dir: str = field(default="/var/lib/pisnoop/reports", metadata={"check": "abspath"})
    # fast: the steady state counted in bulk (analyser/fast.py); reference: the per-packet engine, same results
    engine: Literal["fast", "reference"] = "fast"
    # seconds between writes of the changed flow records and the resume point (0: after every step); a restart
    # reads again what was analysed since the last write (analyser/live.py)
    flush_interval: float = field(default=2.0, metadata=value_range(0, 60, "seconds from 0 to 60"))
    # connections tracked in memory at most (~2.4 KB each); when full, a new one toward no server port is not
    # recorded (counted in ``untracked``), so that an attacker rotating addresses cannot exhaust memory or the
    # store (analyser/flows.py)
    max_flows: int = field(default=100_000, metadata=value_range(1000, 10_000_000, "flows from 1000 to 10000000"))


@dataclass(frozen=True)
class Metrics:
    enabled: bool = True
    listen_host: str = field(default="127.0.0.1", metadata={"check": "ip"})
    controller_port: int = field(default=9610, metadata=port_range())
    snooper_port: int = field(default=9611, metadata=port_range())
    analyser_port: int = field(default=9612, metadata=port_range())


@dataclass(frozen=True)
class Web:
    """The dashboard (``pisnoop web``, ``webui/``): where it listens, who may log in, how long a login lasts."""
    listen_host: str = field(default="127.0.0.1", metadata={"check": "ip"})
    port: int = field(default=8088, metadata=port_range())
    # from `pisnoop web --hash-password` (scrypt or pbkdf2_sha256, salted); null: the dashboard refuses to start
    password_hash: Optional[str] = field(default=None, metadata={"check": "password_hash"})
    session_seconds: int = field(default=3600, metadata=value_range(60, 604_800, "seconds from 60 to 604800"))


@dataclass(frozen=True)
class Alerts:
    """Where events go (``appliance/alerts.py``): a log line always, a JSON POST to each webhook when any."""
    webhooks: tuple[str, ...] = field(default=(), metadata={"check": "http_url", "items": (0, 8), "unique": True})
    timeout_seconds: float = field(default=5.0, metadata=value_range(0.1, 120, "seconds from 0.1 to 120"))
    queue_size: int = field(default=1000, metadata=value_range(1, 100_000, "alerts from 1 to 100000"))
    # one alert is retried (back-off doubling up to retry_max_seconds) for this long, then counted dropped
    retry_seconds: float = field(default=3600.0, metadata=value_range(0, 604_800, "seconds from 0 to 604800"))
    retry_max_seconds: float = field(default=60.0, metadata=value_range(0.1, 3600, "seconds from 0.1 to 3600"))
    store_down_seconds: float = field(default=60.0, metadata=value_range(1, 86400, "seconds from 1 to 86400"))
    service_down_seconds: float = field(default=60.0, metadata=value_range(1, 86400, "seconds from 1 to 86400"))


@dataclass(frozen=True)
class Config:
    switch: Switch = field(default_factory=Switch)
    mirror: Mirror = field(default_factory=Mirror)
    xmpp: Xmpp = field(default_factory=Xmpp)
    enforce: Enforce = field(default_factory=Enforce)
    flowstats_ids: FlowstatsIds = field(default_factory=FlowstatsIds)
    snooper: Snooper = field(default_factory=Snooper)
    mongodb: MongoDB = field(default_factory=MongoDB)
    analyser: Analyser = field(default_factory=Analyser)
    metrics: Metrics = field(default_factory=Metrics)
    alerts: Alerts = field(default_factory=Alerts)
    web: Web = field(default_factory=Web)
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})


# --- loading -----------------------------------------------------------------


def resolve_path(path: str | os.PathLike | None = None) -> Path:
    """``--config`` wins over ``PISNOOP_CONFIG``, which wins over the default."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load(path: str | os.PathLike | None = None) -> Config:
    """Read, parse and validate a config file; raise ``ConfigError`` on any fault."""
    p = resolve_path(path)
    src = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(src, "", _MISSING, "an existing config file (none at that path)") from None
    except IsADirectoryError:
        raise ConfigError(src, "", "<directory>", "a YAML file, not a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(src, "", "<unreadable>", f"a readable UTF-8 YAML file ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or "a syntax error"
        raise ConfigError(src, "", f"invalid YAML at {where}", f"valid YAML ({problem})") from None
    return from_dict(data, src)


# Keys an older release wrote: (section, old key, new key, how the old value becomes the new one).
RENAMED = (("xmpp", "server_port", "server_ports", lambda v: [v]),)


def _renamed(data: Any, source: str) -> Any:
    """The data with old keys under their new names, so an upgraded appliance keeps its config file."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for section, old, new, convert in RENAMED:
        sec = out.get(section)
        if isinstance(sec, dict) and old in sec:
            if new in sec:
                raise ConfigError(source, f"{section}.{old}", sec[old], f"only one of {section}.{old} (the old "
                                  f"name) and {section}.{new}")
            sec = dict(sec)
            sec[new] = convert(sec.pop(old))
            out[section] = sec
    return out


def _as_written(exc: ConfigError, data: Any) -> ConfigError:
    """A refusal of a renamed key's value, named as the file wrote it (``xmpp.server_port: got 70000``)."""
    for section, old, new, _convert in RENAMED:
        sec = data.get(section) if isinstance(data, dict) else None
        if isinstance(sec, dict) and old in sec and exc.key.split("[")[0] == f"{section}.{new}":
            return ConfigError(exc.source, f"{section}.{old}", sec[old], exc.expected)
    return exc


def from_dict(data: Any, source: str = "<dict>") -> Config:
    """Validate plain data (as parsed from YAML) into a ``Config``."""
    if data is None:
        data = {}
    renamed = _renamed(data, source)
    try:
        cfg = build_section(Config, renamed, "", source)
    except ConfigError as exc:
        raise _as_written(exc, data) from None
    cfg = dataclasses.replace(cfg, source=source)
    _cross_checks(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The plain-data form of a config, ready to be dumped as YAML."""
    out = dataclasses.asdict(cfg, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in items})
    out.pop("source", None)
    return out


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is tuple:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def build_section(cls: type, data: Any, prefix: str, src: str):
    """Validate one mapping into dataclass ``cls``; ``prefix`` is its key path for messages."""
    if not isinstance(data, dict):
        raise ConfigError(src, prefix or "(top level)", data, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(src, path, data[key], "no such key; known keys here: " + ", ".join(known))
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], data[name], f.metadata, path, src)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, meta: Any, path: str, src: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, meta, path, src) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        return build_section(tp, {} if value is None else value, path, src)
    if origin is tuple:
        return _convert_list(typing.get_args(tp)[0], value, meta, path, src)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(src, path, value, _type_name(tp))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(src, path, value, "true or false")
        return value
    if tp is int:
        if meta.get("hex") and isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise ConfigError(src, path, value, meta.get("what") or "an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(src, path, value, meta.get("what") or "an integer")
        _check_range(value, meta, path, src)
        if meta.get("pow2") and value & (value - 1):
            raise ConfigError(src, path, value, meta["what"])
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError(src, path, value, meta.get("what") or "a number")
        _check_range(value, meta, path, src)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(src, path, value, "a string")
        _check_string(value, meta.get("check"), path, src)
        return value
    raise TypeError(f"config schema has an unsupported type at {path}: {tp!r}")


def _convert_list(item: Any, value: Any, meta: Any, path: str, src: str) -> tuple:
    """A YAML list into a tuple; each item checked like a scalar of type ``item`` (``path[i]`` in messages)."""
    lo, hi = meta.get("items", (0, None))
    count = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
    item_meta = {k: v for k, v in meta.items() if k not in ("items", "unique")}
    if not isinstance(value, list):
        raise ConfigError(src, path, value, f"a list of {count} items")
    if len(value) < lo or (hi is not None and len(value) > hi):
        raise ConfigError(src, path, value, f"a list of {count} items")
    out = tuple(_convert(item, v, item_meta, f"{path}[{i}]", src) for i, v in enumerate(value))
    if meta.get("unique"):
        seen = set()
        for i, v in enumerate(out):
            key = _canonical(v, meta.get("check"))
            if key in seen:
                raise ConfigError(src, f"{path}[{i}]", value[i], "an item that is not already in the list")
            seen.add(key)
    return out


def _canonical(value: Any, check: str | None) -> Any:
    return ipaddress.ip_network(value, strict=False) if check == "ipnet" else value


def _check_range(value: float, meta: Any, path: str, src: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(src, path, value, meta.get("what") or f"a value from {lo} to {hi}")


def _check_string(value: str, check: str | None, path: str, src: str) -> None:
    if check == "ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ConfigError(src, path, value, "an IPv4 or IPv6 address") from None
    elif check == "ipnet":
        try:
            ipaddress.ip_network(value, strict=True)
        except ValueError:
            raise ConfigError(src, path, value, "an IPv4 or IPv6 address or prefix (ADDR or ADDR/LEN, no host bits "
                              "set after LEN)") from None
    elif check == "mac":
        if not re.match(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", value):
            raise ConfigError(src, path, value, "a MAC address aa:bb:cc:dd:ee:ff (lower case)")
    elif check == "ifname":
        if not _IFNAME.match(value):
            raise ConfigError(src, path, value, "an interface name of 1 to 15 characters (letters, digits, _ . - : @)")
    elif check == "netns":
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", value):
            raise ConfigError(src, path, value, "a network namespace name (letters, digits, _ . -)")
    elif check == "name":
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", value):
            raise ConfigError(src, path, value, "a name of 1 to 64 letters, digits, _ or -")
    elif check == "abspath":
        if not value.startswith("/"):
            raise ConfigError(src, path, value, "an absolute path")
    elif check == "http_url":
        if not re.match(r"^https?://[^\s/]+(/\S*)?$", value):
            raise ConfigError(src, path, value, "an http:// or https:// URL")
    elif check == "password_hash":
        if not PASSWORD_HASH.match(value):
            raise ConfigError(src, path, "<not shown>", "a hash from `pisnoop web --hash-password` "
                              "(scrypt$N$r$p$SALT$HASH or pbkdf2_sha256$ITERATIONS$SALT$HASH, hex)")
    elif check == "mongo_uri":
        if not re.match(r"^mongodb(\+srv)?://[^\s]+$", value):
            raise ConfigError(src, path, value, "a MongoDB URI starting with mongodb:// or mongodb+srv://")


def _cross_checks(cfg: Config) -> None:
    """Rules that involve more than one key."""
    src = cfg.source
    ports = cfg.switch.ports
    named = {"inside": ports.inside, "mirror": ports.mirror, "upstream": ports.upstream}
    if ports.management is not None:
        named["management"] = ports.management
    seen: dict[int, str] = {}
    for name, number in named.items():
        if number in seen:
            raise ConfigError(src, f"switch.ports.{name}", number,
                              f"a port number different from switch.ports.{seen[number]}")
        seen[number] = name
    if cfg.switch.target == "zodiacfx":
        for name in ("inside", "mirror", "upstream"):
            number = named[name]
            if not 1 <= number <= 3:
                raise ConfigError(src, f"switch.ports.{name}", number,
                                  "1, 2 or 3 on a Zodiac FX (port 4 is management)")
        if ports.management not in (None, 4):
            raise ConfigError(src, "switch.ports.management", ports.management,
                              "4 (the Zodiac FX management port) or null")
        for key in ("meter", "penalty_meter"):
            if getattr(cfg.xmpp, key).burst:
                raise ConfigError(src, f"xmpp.{key}.burst", getattr(cfg.xmpp, key).burst,
                                  "0 on a Zodiac FX (no BURST flag)")
    mf = cfg.mirror.filter
    if mf.l4_port is not None and mf.ip_proto is None:
        raise ConfigError(src, "mirror.filter.l4_port", mf.l4_port, "mirror.filter.ip_proto set to tcp or udp as well")
    if cfg.xmpp.per_ip_threshold_ppm < cfg.xmpp.threshold_ppm:
        raise ConfigError(src, "xmpp.per_ip_threshold_ppm", cfg.xmpp.per_ip_threshold_ppm,
                          f"at least xmpp.threshold_ppm ({cfg.xmpp.threshold_ppm})")
    for key in ("per_host_threshold_ppm", "per_prefix_threshold_ppm"):
        if getattr(cfg.xmpp, key) < cfg.xmpp.per_ip_threshold_ppm:
            raise ConfigError(src, f"xmpp.{key}", getattr(cfg.xmpp, key),
                              f"at least xmpp.per_ip_threshold_ppm ({cfg.xmpp.per_ip_threshold_ppm})")
    if cfg.flowstats_ids.idle_timeout > cfg.flowstats_ids.hard_timeout:
        raise ConfigError(src, "flowstats_ids.idle_timeout", cfg.flowstats_ids.idle_timeout,
                          f"at most flowstats_ids.hard_timeout ({cfg.flowstats_ids.hard_timeout})")
    if cfg.enforce.escalation.max_seconds < cfg.enforce.ban_seconds:
        raise ConfigError(src, "enforce.escalation.max_seconds", cfg.enforce.escalation.max_seconds,
                          f"at least enforce.ban_seconds ({cfg.enforce.ban_seconds})")
    flags_days, memory = cfg.mongodb.retention.flags_days, cfg.enforce.escalation.memory_seconds
    if flags_days and flags_days * 86400 < memory:
        raise ConfigError(src, "mongodb.retention.flags_days", flags_days, f"0 (keep) or at least "
                          f"enforce.escalation.memory_seconds ({memory} s = {memory / 86400:g} days): "
                          "escalation counts the offences kept")
    m = cfg.metrics
    mports = {"controller_port": m.controller_port, "snooper_port": m.snooper_port, "analyser_port": m.analyser_port}
    if m.enabled and len(set(mports.values())) != 3:
        dup = [k for k, v in mports.items() if list(mports.values()).count(v) > 1][-1]
        raise ConfigError(src, f"metrics.{dup}", mports[dup], "a port different from the other metrics ports")
