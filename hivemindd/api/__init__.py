"""The control API: aiohttp routes, who may call them, connection limits, /metrics, the dashboard.

The Daemon (host/core.py) wires these to its handlers. Imports: wire and the standard
library, aiohttp, prometheus-client; never host, the trainer or hmctl.
"""
