#!/usr/bin/env python
"""Django's command-line utility for ChatStream."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatstream_site.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        settings.INSTALLED_APPS  # noqa: B018 - load settings now, so a bad one stops us here
        if sys.argv[1:2] == ["role"]:
            # `role` checks its servers and execs the real server, which sets Django up itself: without
            # django.setup() and the system checks here, a (re)start under the supervisor costs half the CPU.
            from chatstream_site.management.commands.role import Command

            Command().run_from_argv(sys.argv)
            return
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # A bad setting is the operator's to fix: say which, without a traceback.
        sys.exit(f"configuration error: {exc}")


if __name__ == "__main__":
    main()
