"""The config as the controller reads it: the validated Config plus derived values."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config import Config

from .messages import ETH_IPV4, IPPROTO_TCP
from .targets import Profile, profile


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

    def xmpp_match(self) -> dict:
        """Client-to-server XMPP: TCP toward server_port arriving from the inside."""
        return {"in_port": self.ports.inside, "eth_type": ETH_IPV4, "ip_proto": IPPROTO_TCP,
                "tcp_dst": self.cfg.xmpp.server_port}
