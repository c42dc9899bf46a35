"""The trainer: runs only inside ``python -m hivemindd.trainer``, never imported by the daemon or hmctl.

``loop.py`` is its life (prepare, join, resume, train, leave), ``training.py`` the step
loop, ``snapshots.py`` what checkpoints hold, ``strategies/`` how peers average (one
module per ``[averaging] strategy``), ``swarm.py`` its own DHT; data comes through
``data.py``, ``folder_tree.py`` and ``storage.py``.

Imports: wire (the launch and the spec), torch, torchvision, hivemind, webdataset; never
host, api or hmctl. It talks to the daemon through JSON-line events on an inherited fd.
"""
