"""Tools around a run: ``hivemindd demo`` (a local swarm), ``hmctl dataset pack``, predict.

``predict.py`` runs as its own process (``python -m hivemindd.tools.predict``) and may
import the trainer's model code; the others use only hmctl's client and wire.
"""
