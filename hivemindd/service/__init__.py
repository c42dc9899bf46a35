"""Running hivemindd as a service: systemd and launchd units, ``hivemindd service install``, sd_notify.

Imports: host (its config and state dir), wire, the standard library.
"""
