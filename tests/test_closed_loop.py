"""Acceptance: the whole appliance, real XMPP, the abusive client detected and blocked end to end."""

from __future__ import annotations

from lab import demo, scenario


def test_abusive_client_is_flagged_and_blocked_while_benign_clients_chat(tmp_path):
    opts = scenario.Options(benign=2, warmup=6, after_block=6, timeout=90, out_dir=tmp_path / "out")
    result, va = scenario.run(opts)
    try:
        assert result.blocked, result.errors
        assert result.flagged_ips == [scenario.ABUSER_IP]
        assert result.drop_packets > 0, "the abusive client's packets hit the drop flow at the switch"
        mal = result.abuser_jid
        assert result.received.get(mal, 0) == result.abuser_received_at_block, \
            "once the block has settled, none of the abusive client's messages arrive"
        assert result.sent[mal] > result.received.get(mal, 0)
        for jid in result.benign_jids:
            assert result.sent[jid] > 0 and result.received.get(jid) == result.sent[jid], jid
        assert result.unaccounted == 0, result.snooper
        assert result.abuser_frames_stored > 0, "the mirror copy of the blocked client's traffic is stored"
        assert result.flag["evidence"], result.flag
        assert not demo.verdict(result), demo.verdict(result)
    finally:
        assert not va.down()
