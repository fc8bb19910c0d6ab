"""The web client (gateway/webclient/) in Debian's chromium, and its reading of the API schema."""
