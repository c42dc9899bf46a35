"""hmctl: commands, what they print, and the stdlib HTTP client of the control API.

Imports: wire, click and the standard library only; no torch, torchvision, hivemind,
aiohttp or trainer (hmctl answers in milliseconds). ``hivemindd/cli.py`` is the entry point.
"""
