"""Contracts shared by the daemon, hmctl and the trainer: what crosses a process boundary.

``protocol.py`` (control API routes, requests, replies, exit codes), ``spec.py`` (the run
spec every peer trains with), ``launch.py`` (what the supervisor hands a trainer),
``openapi.yaml`` (the API for other clients). Imports: the standard library only, so
every side can use them without pulling in torch, hivemind or aiohttp.
"""
