"""`python -m flaxcnn.predict --workdir DIR ...`: see flaxcnn.cli.predict."""

import sys

from flaxcnn.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
