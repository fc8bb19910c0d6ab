"""The close codes a client can receive are one table: core/closecodes.py is what the gateway and
the brokers send, docs/protocol.md is what clients read. A code added to one and not the other fails here."""

from __future__ import annotations

import re

from chatstream_site.localservers import ROOT
from core import closecodes


def test_every_close_code_sent_is_documented_and_every_documented_one_is_sent() -> None:
    sent = {value for name, value in vars(closecodes).items() if name.startswith("CLOSE_")}
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    table = protocol[protocol.index("### Close codes"):protocol.index("### Content")]
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", table, re.M)}
    # 1006 is no close frame at all (the TCP connection dropped): documented for clients, never sent.
    assert documented - {1006} == sent, (sorted(documented), sorted(sent))
    assert len(set(sent)) == len([n for n in vars(closecodes) if n.startswith("CLOSE_")]), "a code used twice"
