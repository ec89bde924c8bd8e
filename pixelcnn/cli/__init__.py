"""Command line: train (single, multigpu, multiworker); on a trained run sample,
evaluate, complete, export, compress, decompress, ood. ``python main.py ...`` and the
``pixelcnn`` console script run ``main``.

The group and what the commands share are ``cli.app``; the commands live in
``cli.train_commands`` and ``cli.run_commands`` and are added to the group here, so
which commands exist does not depend on import order.
"""

from pixelcnn.cli import run_commands, train_commands
from pixelcnn.cli.app import main

for _command in (*train_commands.COMMANDS, *run_commands.COMMANDS):
    main.add_command(_command)

__all__ = ["main"]
