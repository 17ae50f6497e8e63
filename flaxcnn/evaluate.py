"""`python -m flaxcnn.evaluate --workdir DIR ...`: see flaxcnn.cli.evaluate."""

from flaxcnn.cli import exit_now
from flaxcnn.cli.evaluate import main

if __name__ == "__main__":
    exit_now(main())
