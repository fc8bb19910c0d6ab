"""The gateway (gateway/) and the security findings, against real gateway, api and broker processes."""
