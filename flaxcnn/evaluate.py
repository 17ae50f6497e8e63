"""`python -m flaxcnn.evaluate --workdir DIR ...`: see flaxcnn.cli.evaluate."""

import sys

from flaxcnn.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
