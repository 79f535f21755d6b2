"""The one place the Ryu API is imported from.

pisnoop runs on os-ken (the maintained Ryu fork, same API under ``os_ken``);
to run on ``ryu`` instead, change the ``_PKG`` line. os-ken 4 uses native
threads for its hub unless OSKEN_HUB_TYPE says otherwise; pisnoop pins
``native`` so that the store thread and the event loop are plain threads.
"""

from __future__ import annotations

import importlib
import os

_PKG = "os_ken"      # "ryu" for Ryu

os.environ["OSKEN_HUB_TYPE"] = "native"

app_manager = importlib.import_module(f"{_PKG}.base.app_manager")
cfg = importlib.import_module(f"{_PKG}.cfg")
ofp_event = importlib.import_module(f"{_PKG}.controller.ofp_event")
handler = importlib.import_module(f"{_PKG}.controller.handler")
event = importlib.import_module(f"{_PKG}.controller.event")
ofproto_v1_3 = importlib.import_module(f"{_PKG}.ofproto.ofproto_v1_3")
hub = importlib.import_module(f"{_PKG}.lib.hub")

RyuApp = getattr(app_manager, "OSKenApp", None) or app_manager.RyuApp
set_ev_cls = handler.set_ev_cls
CONFIG_DISPATCHER = handler.CONFIG_DISPATCHER
MAIN_DISPATCHER = handler.MAIN_DISPATCHER
DEAD_DISPATCHER = handler.DEAD_DISPATCHER
EventBase = event.EventBase
CONF = cfg.CONF
OFP_VERSION = ofproto_v1_3.OFP_VERSION
