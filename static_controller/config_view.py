"""The config as the controller reads it: the validated Config plus derived values."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config import Config

from .messages import ETH_IPV4, ETH_IPV6, IPPROTO_TCP, IPPROTO_UDP
from .targets import Profile, profile

ETH_TYPES = {4: ETH_IPV4, 6: ETH_IPV6}
IP_PROTOS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}


@dataclass(frozen=True)
class View:
    cfg: Config

    @property
    def profile(self) -> Profile:
        return profile(self.cfg.switch.target)

    @property
    def ports(self):
        return self.cfg.switch.ports

    @property
    def data_ports(self) -> tuple[int, int]:
        """The two ports traffic is forwarded between (never the mirror or management port)."""
        return (self.ports.inside, self.ports.upstream)

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions whose protocol and ports the target can match: (4, 6), or (4,) on a switch without IPv6
        matching (the Zodiac FX: there IPv6 XMPP is neither metered nor told apart, docs/ARCHITECTURE.md)."""
        return (4, 6) if self.profile.ipv6 else (4,)

    @staticmethod
    def l4_match(in_port: int, version: int, protocol: str, dst_port: int) -> dict:
        """Frames of ``protocol`` (tcp/udp) over IPv``version`` toward ``dst_port`` arriving on ``in_port``."""
        return {"in_port": in_port, "eth_type": ETH_TYPES[version], "ip_proto": IP_PROTOS[protocol],
                f"{protocol}_dst": dst_port}

    def xmpp_matches(self) -> list[dict]:
        """Client-to-server XMPP: TCP toward each of ``xmpp.server_ports`` from the inside, every family."""
        return [self.l4_match(self.ports.inside, v, "tcp", p) for v in self.families
                for p in self.cfg.xmpp.server_ports]

    def xmpp_match(self) -> dict:
        """The first of ``xmpp_matches`` (IPv4, the first server port): only for code not yet taught the list."""
        return self.xmpp_matches()[0]
