"""The trainer: runs only inside ``python -m hivemindd.trainer``, never imported by the daemon or hmctl.

Imports: wire (the launch and the spec), torch, torchvision, hivemind, webdataset; never
host, api or hmctl. It talks to the daemon through JSON-line events on an inherited fd.
"""
