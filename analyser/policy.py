"""The classifier policy: which classifiers run, with which thresholds.

A YAML file (``analyser.policy_file``) validated exactly like the config — the
same dataclass schema machinery and the same one-line ``ConfigError`` naming
the file, the key, the value and what was expected — so a bad policy stops
the analyser at start with exit code 2. Without a policy file the built-in
policy runs ``xmpp_abuse`` with the thresholds of the config's ``xmpp``
section. Thresholds left null in the policy also come from the config.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from appliance import config as config_mod
from appliance.config import ConfigError, build_section, port_range, value_range

from .classifiers import builtin, custom

Action = Optional[Literal["drop", "limit"]]
# who enforces a classifier's flags when appliances share a store (appliance/flagdoc.py, ``scope``); ``scope`` in a
# classifier's section is the subject it counts (connection or ip), so this is ``flag_scope`` like ``flag_direction``
FlagScope = Literal["local", "fleet"]
_PPM = value_range(1, 10_000_000, "a count per minute from 1 to 10000000")
_WINDOW = value_range(1, 3600, "seconds from 1 to 3600")


@dataclass(frozen=True)
class XmppAbusePolicy:
    enabled: bool = True
    server_port: Optional[int] = field(default=None, metadata=port_range())     # the old name: one port
    server_ports: Optional[tuple[int, ...]] = field(default=None, metadata={
        **port_range(), "items": (1, 8), "unique": True})
    threshold_ppm: Optional[int] = field(default=None, metadata=_PPM)
    per_ip_threshold_ppm: Optional[int] = field(default=None, metadata=_PPM)
    per_host_threshold_ppm: Optional[int] = field(default=None, metadata=_PPM)
    per_prefix_threshold_ppm: Optional[int] = field(default=None, metadata=_PPM)
    connection_cost: Optional[int] = field(default=None, metadata=value_range(0, 1000, "packets from 0 to 1000"))
    window_seconds: Optional[float] = field(default=None, metadata=_WINDOW)
    action: Action = None
    flag_scope: FlagScope = "local"


@dataclass(frozen=True)
class BandwidthHogPolicy:
    enabled: bool = False
    bytes_per_second: int = field(default=1_000_000,
                                  metadata=value_range(1, 10**11, "bytes per second from 1 to 10^11"))
    window_seconds: float = field(default=10.0, metadata=_WINDOW)
    scope: str = "ip"
    server_port: Optional[int] = field(default=None, metadata=port_range())
    protocol: str = "tcp"
    flag_direction: str = "outbound"
    action: Action = None
    flag_scope: FlagScope = "local"


@dataclass(frozen=True)
class PayloadRule:
    name: str = field(default="", metadata={"check": "name"})
    pattern: str = ""
    threshold_per_minute: int = field(default=60, metadata=_PPM)
    window_seconds: float = field(default=60.0, metadata=_WINDOW)
    server_port: Optional[int] = field(default=None, metadata=port_range())
    direction: Literal["c2s", "s2c", "both"] = "c2s"
    scope: str = "connection"
    protocol: str = "tcp"
    flag_direction: str = "outbound"
    action: Action = None
    flag_scope: FlagScope = "local"


@dataclass(frozen=True)
class Policy:
    xmpp_abuse: XmppAbusePolicy = field(default_factory=XmppAbusePolicy)
    bandwidth_hog: BandwidthHogPolicy = field(default_factory=BandwidthHogPolicy)
    payload_match: tuple = ()
    custom_dir: Optional[str] = None
    custom_action: Action = None
    custom_flag_scope: FlagScope = "local"
    custom: tuple = ()  # (name, class) loaded from custom_dir
    source: str = "<built-in policy>"


def load(path: Optional[str]) -> Policy:
    """The policy in ``path`` (None: the built-in one); ``ConfigError`` when it cannot be used."""
    if path is None:
        return Policy()
    src = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(src, "", None, "an existing policy file (none at that path)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(src, "", "<unreadable>", f"a readable UTF-8 YAML file ({exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(src, "", f"invalid YAML at {where}", "valid YAML") from None
    return from_dict(data, src, Path(path).parent)


def from_dict(data, src: str = "<dict>", base: Path = Path(".")) -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(src, "(top level)", data, "a mapping of keys to values")
    known = ("xmpp_abuse", "bandwidth_hog", "payload_match", "custom_dir", "custom_action", "custom_flag_scope")
    for key in data:
        if key not in known:
            raise ConfigError(src, str(key), data[key], "no such key; known keys here: " + ", ".join(known))
    top = build_section(Policy, {k: v for k, v in data.items()
                                 if k in ("xmpp_abuse", "bandwidth_hog", "custom_dir", "custom_action",
                                          "custom_flag_scope")}, "", src)
    x = top.xmpp_abuse
    if x.threshold_ppm and x.per_ip_threshold_ppm and x.per_ip_threshold_ppm < x.threshold_ppm:
        raise ConfigError(src, "xmpp_abuse.per_ip_threshold_ppm", x.per_ip_threshold_ppm,
                          f"at least xmpp_abuse.threshold_ppm ({x.threshold_ppm})")
    if x.server_port is not None and x.server_ports is not None:
        raise ConfigError(src, "xmpp_abuse.server_port", x.server_port, "only one of xmpp_abuse.server_port (the "
                          "old name) and xmpp_abuse.server_ports")
    rules = _payload_rules(data.get("payload_match"), src)
    loaded = _custom(top.custom_dir, src, base) if top.custom_dir else ()
    policy = dataclasses.replace(top, payload_match=rules, custom=loaded, source=src)
    _enforceable(policy)
    return policy


SCOPES = ("connection", "ip")
FLAG_PROTOCOLS = ("tcp", "udp")
FLAG_DIRECTIONS = ("outbound", "inbound")


def _refuse(src: str, key: str, value, name: str, expected: str, why: str):
    raise ConfigError(src, key, value, f"{expected} (classifier {name} could raise flags enforce cannot apply: {why})")


def _enforceable(policy: Policy) -> None:
    """Refuse, in one line naming the classifier, a classifier whose verdicts enforce could not turn into a flow.

    A ban is an OpenFlow drop or limit on TCP or UDP packets of one subject
    toward server ports, on the inside (outbound) or upstream (inbound) side:
    a verdict about ICMP or any protocol, a scope or a side outside that,
    would be shown as flagged and block nothing.
    """
    src = policy.source
    checks = []
    if policy.bandwidth_hog.enabled:
        b = policy.bandwidth_hog
        checks.append(("bandwidth_hog", "bandwidth_hog", b.protocol, b.scope, b.flag_direction))
    for i, r in enumerate(policy.payload_match):
        checks.append((f"payload_match[{i}]", r.name, r.protocol, r.scope, r.flag_direction))
    for where, name, protocol, scope, direction in checks:
        if protocol not in FLAG_PROTOCOLS:
            _refuse(src, f"{where}.protocol", protocol, name, "tcp or udp", "a ban names TCP or UDP ports")
        if scope not in SCOPES:
            _refuse(src, f"{where}.scope", scope, name, "connection or ip",
                    "these classifiers flag a connection or an address")
        if direction not in FLAG_DIRECTIONS:
            _refuse(src, f"{where}.flag_direction", direction, name, "outbound or inbound",
                    "a ban applies to the inside or the upstream side")
    for name, cls in policy.custom:
        for attr, allowed in (("scope", SCOPES), ("protocol", FLAG_PROTOCOLS), ("direction", FLAG_DIRECTIONS)):
            value = getattr(cls, attr, None)
            if value is not None and value not in allowed:
                _refuse(src, "custom_dir", f"{name}.{attr} = {value!r}", name, " or ".join(allowed),
                        f"its {attr} is outside what a flag can say")


def _payload_rules(items, src: str) -> tuple:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ConfigError(src, "payload_match", items, "a list of rules (mappings with name and pattern)")
    rules, names = [], set()
    for i, item in enumerate(items):
        where = f"payload_match[{i}]"
        rule = build_section(PayloadRule, item, where, src)
        for key in ("name", "pattern"):
            if not getattr(rule, key):
                raise ConfigError(src, f"{where}.{key}", item.get(key), "a non-empty string (required)")
        try:
            re.compile(rule.pattern.encode())
        except re.error as exc:
            raise ConfigError(src, f"{where}.pattern", rule.pattern, f"a valid regular expression ({exc})") from None
        if rule.name in names or rule.name in ("xmpp_abuse", "bandwidth_hog"):
            raise ConfigError(src, f"{where}.name", rule.name, "a name no other classifier has")
        names.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def _custom(directory: str, src: str, base: Path) -> tuple:
    path = Path(directory)
    if not path.is_absolute():
        path = base / path
    if not path.is_dir():
        raise ConfigError(src, "custom_dir", directory, "an existing directory of classifier files")
    try:
        return tuple(custom.load_dir(path))
    except custom.LoadError as exc:
        file, expected = exc.args
        raise ConfigError(src, "custom_dir", file, expected) from None


def build(policy: Policy, cfg: config_mod.Config, neighbours=None) -> list:
    """The classifier objects the policy asks for, thresholds filled in from the config, each with the
    ``flag_scope`` its flags get."""
    out = _build(policy, cfg, neighbours)
    scopes = [policy.xmpp_abuse.flag_scope] * policy.xmpp_abuse.enabled
    scopes += [policy.bandwidth_hog.flag_scope] * policy.bandwidth_hog.enabled
    scopes += [r.flag_scope for r in policy.payload_match] + [policy.custom_flag_scope] * len(policy.custom)
    for classifier, scope in zip(out, scopes, strict=True):
        classifier.flag_scope = scope
    return out


def _build(policy: Policy, cfg: config_mod.Config, neighbours=None) -> list:
    out = []
    x = policy.xmpp_abuse
    if x.enabled:
        thr, ip_thr = threshold_ppm(policy, cfg), ip_threshold_ppm(policy, cfg)
        if ip_thr < thr:
            raise ConfigError(policy.source, "xmpp_abuse.per_ip_threshold_ppm", ip_thr,
                              f"at least the per-connection threshold ({thr})")
        host_thr = max(x.per_host_threshold_ppm or cfg.xmpp.per_host_threshold_ppm, ip_thr)
        prefix_thr = max(x.per_prefix_threshold_ppm or cfg.xmpp.per_prefix_threshold_ppm, ip_thr)
        cost = cfg.xmpp.connection_cost if x.connection_cost is None else x.connection_cost
        out.append(builtin.XmppAbuse(server_ports(policy, cfg), thr, ip_thr, window_seconds(policy, cfg), x.action,
                                     host_thr, prefix_thr, cost, neighbours))
    b = policy.bandwidth_hog
    if b.enabled:
        out.append(builtin.BandwidthHog(b.bytes_per_second, b.window_seconds, b.scope, b.server_port, b.action,
                                        b.protocol, b.flag_direction))
    for r in policy.payload_match:
        out.append(builtin.PayloadMatch(r.name, r.pattern, r.threshold_per_minute, r.window_seconds,
                                        r.server_port, r.direction, r.scope, r.action, r.protocol, r.flag_direction))
    for name, cls in policy.custom:
        try:
            instance = cls()
        except Exception as exc:
            raise ConfigError(policy.source, "custom_dir", name, "a class that can be created without arguments "
                              f"({exc.__class__.__name__}: {exc})") from None
        out.append(custom.CustomClassifier(instance, name, policy.custom_action))
    return out


def threshold_ppm(policy: Policy, cfg: config_mod.Config) -> int:
    """The per-connection XMPP threshold in force (for the report's threshold line)."""
    return policy.xmpp_abuse.threshold_ppm or cfg.xmpp.threshold_ppm


def ip_threshold_ppm(policy: Policy, cfg: config_mod.Config) -> int:
    return policy.xmpp_abuse.per_ip_threshold_ppm or max(cfg.xmpp.per_ip_threshold_ppm, threshold_ppm(policy, cfg))


def server_ports(policy: Policy, cfg: config_mod.Config) -> tuple[int, ...]:
    """The XMPP ports in force: the policy's (``server_ports``, or the old ``server_port``), else the config's."""
    x = policy.xmpp_abuse
    if x.server_ports:
        return tuple(x.server_ports)
    return (x.server_port,) if x.server_port else tuple(cfg.xmpp.server_ports)


def window_seconds(policy: Policy, cfg: config_mod.Config) -> float:
    return policy.xmpp_abuse.window_seconds or cfg.xmpp.window_seconds
