"""``hmctl``, the entry point: the commands of ``hmctl/`` plus the tools' (``hmctl dataset pack``).

``python -m hivemindd.cli`` and the ``hmctl`` script both run ``main``.
"""

from __future__ import annotations

from hivemindd.hmctl.commands import main
from hivemindd.tools.dataset_pack.command import dataset

main.add_command(dataset)

__all__ = ["main"]

if __name__ == "__main__":
    main()
