"""The host daemon: one per machine, owns the DHT node, discovery, the supervisor and the API.

``core.py`` (the Daemon's start → run → stop), ``config.py`` (flags, environment, file),
``state.py`` (desired state and the state dir), ``dht.py`` (the host's hivemind DHT in a
child process), ``supervisor.py`` and ``process.py`` (the trainer subprocess),
``logfile.py``, ``observer.py`` (status and history for the API), ``swarm_view.py``.
Imports: wire, discovery, api; never the trainer (it is a process, not a module), never hmctl.
"""
