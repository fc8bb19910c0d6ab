#!/usr/bin/env python3
"""supervisord event listener of ``make run``: one prefixed log stream, and a loud line when a role is given up.

supervisord (docs/adr/0024) sends every chunk a program writes (PROCESS_LOG) and every state change
(PROCESS_STATE) to this process over the event listener protocol (READY / header / payload / RESULT on stdin and
stdout). It writes to stderr, which supervisord passes to the terminal:

- each complete output line as ``api1     | <line>`` (coloured by program when CHATSTREAM_LOG_COLOR=1);
- ``supervisor | api1 exited unexpectedly ...`` when a role dies and is restarted, and ``... failed to start``
  with the back-off before the next try;
- a framed ``GAVE UP`` line naming the program and what to do when supervisord stops retrying (FATAL).

Standard library only; it never writes anything else to stdout (that is the protocol channel).
"""

from __future__ import annotations

import os
import sys
import zlib
from typing import BinaryIO

WIDTH = 10  # "supervisor", the longest name printed (programs: "storage2", "ferretdb")
COLORS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")


def parse_header(line: bytes) -> dict[str, str]:
    return dict(token.split(":", 1) for token in line.decode("utf-8", "replace").split() if ":" in token)


class Printer:
    """Turns chunks into whole prefixed lines; a partial line waits for the rest of it (or its program's exit)."""

    def __init__(self, out: BinaryIO, *, color: bool) -> None:
        self.out = out
        self.color = color
        self.partial: dict[str, bytes] = {}

    def prefix(self, name: str) -> bytes:
        label = f"{name:<{WIDTH}}|"
        if self.color:
            code = "1;31" if name == "supervisor" else COLORS[zlib.crc32(name.encode()) % len(COLORS)]
            label = f"\033[{code}m{label}\033[0m"
        return label.encode() + b" "

    def output(self, name: str, data: bytes) -> None:
        data = self.partial.pop(name, b"") + data
        *lines, rest = data.split(b"\n")
        if rest:
            self.partial[name] = rest
        prefix = self.prefix(name)
        self.out.write(b"".join(prefix + line.rstrip(b"\r") + b"\n" for line in lines))
        self.out.flush()

    def flush(self, name: str) -> None:
        if name in self.partial:
            self.output(name, b"\n")

    def say(self, text: str) -> None:
        self.output("supervisor", text.encode() + b"\n")


def on_state(printer: Printer, event: str, fields: dict[str, str]) -> None:
    name = fields.get("processname", "?")
    ctl = os.environ.get("CHATSTREAM_SUPERVISORCTL", ".venv/bin/supervisorctl -c var/supervisord.conf")
    group = fields.get("groupname", name)
    if event == "PROCESS_STATE_EXITED":
        printer.flush(name)
        if fields.get("expected") == "0":
            printer.say(f"{name} exited unexpectedly (pid {fields.get('pid', '?')}); restarting it")
    elif event == "PROCESS_STATE_BACKOFF":
        printer.flush(name)
        # supervisord waits `tries` seconds before the next try, and gives up once tries > startretries.
        tries = int(fields.get("tries", "0") or 0)
        retries = int(os.environ.get("CHATSTREAM_START_RETRIES", "0") or 0)
        then = f"next try in {tries} s" if tries <= retries else "giving up"
        printer.say(f"{name} failed to start (try {tries}); {then}")
    elif event == "PROCESS_STATE_FATAL":
        printer.flush(name)
        bar = "!" * 100
        printer.say(bar)
        printer.say(f"GAVE UP on {name}: it crashed at start-up on every try (its last lines are above).")
        printer.say("The other processes keep running. Fix the cause (a setting in .env? a port in use?), then")
        printer.say(f"  {ctl} start {group}:{name}     (or Ctrl-C and `make run` again)")
        printer.say(bar)


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    printer = Printer(sys.stderr.buffer, color=os.environ.get("CHATSTREAM_LOG_COLOR") == "1"
                      and "NO_COLOR" not in os.environ)
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:  # supervisord has gone
            return
        header = parse_header(line)
        payload = stdin.read(int(header.get("len", "0")))
        event = header.get("eventname", "")
        head, _, data = payload.partition(b"\n")
        fields = parse_header(head)
        try:
            if event.startswith("PROCESS_LOG"):
                printer.output(fields.get("processname", "?"), data)
            elif event.startswith("PROCESS_STATE"):
                on_state(printer, event, fields)
        except OSError:  # the terminal went away; keep answering supervisord so it never blocks
            pass
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    main()
