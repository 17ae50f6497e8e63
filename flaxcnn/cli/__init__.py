"""Command-line layer: arguments, workdir checks, one-line errors -> library calls.

`flaxcnn COMMAND ...` (the console script of pyproject.toml) runs the same commands as
`python -m flaxcnn.main|evaluate|predict|export|sample ...` and `python -m flaxcnn.cli.scorer`:

    flaxcnn train --workdir W [--config FILE] [--config.KEY=VALUE ...]
    flaxcnn evaluate --workdir W [--split test] ...
    flaxcnn predict --workdir W IMAGE ...
    flaxcnn export --workdir W --out DIR
    flaxcnn sample --workdir W ...
    flaxcnn scorer --dataset mnist
"""

import importlib
import logging
import os
import sys

# Each command and the module whose `main(argv)` runs it.
COMMANDS = {
    "train": "flaxcnn.cli.train",
    "evaluate": "flaxcnn.cli.evaluate",
    "predict": "flaxcnn.cli.predict",
    "export": "flaxcnn.cli.export",
    "sample": "flaxcnn.cli.sample",
    "scorer": "flaxcnn.cli.scorer",
}
USAGE = f"usage: flaxcnn {{{','.join(COMMANDS)}}} [--help] ..."


def run_command(argv: list[str]) -> int:
    """Runs `flaxcnn COMMAND ARGS...` (`argv` without the program name) and returns its exit
    code (train exits by itself on errors and signals, as `python -m flaxcnn.main` does)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\nCommands: {', '.join(COMMANDS)}; `flaxcnn COMMAND --help` for each.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    if command == "train":
        module.run(rest)
        return 0
    return module.main(rest)


def main() -> None:
    """The `flaxcnn` console command: runs the command, then ends the process at once."""
    exit_now(run_command(sys.argv[1:]))


def exit_now(code: int = 0) -> None:
    """Ends a finished command's process at once: its answer is printed and its files are
    closed, so the interpreter's teardown of jax, XLA and their threads (1-2 s) is skipped.
    For `python -m` entries only: never inside a process that goes on (tests)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
