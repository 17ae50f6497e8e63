"""`python -m flaxcnn.main --workdir DIR [--config FILE] [--config.key=value]`: train."""

from flaxcnn.cli import exit_now
from flaxcnn.cli.train import run

if __name__ == "__main__":
    run()  # Errors and signals exit inside, with their codes.
    exit_now(0)
