"""`python -m flaxcnn.sample --workdir DIR ...`: see flaxcnn.cli.sample."""

import sys

from flaxcnn.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
