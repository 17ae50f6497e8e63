"""`python -m flaxcnn.export --workdir DIR ...`: see flaxcnn.cli.export."""

import sys

from flaxcnn.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
