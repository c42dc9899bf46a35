"""The trainer: runs only inside ``python -m hivemindd.trainer``, never imported by the daemon or hmctl."""
