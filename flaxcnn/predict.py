"""`python -m flaxcnn.predict --workdir DIR ...`: see flaxcnn.cli.predict."""

from flaxcnn.cli import exit_now
from flaxcnn.cli.predict import main

if __name__ == "__main__":
    exit_now(main())
