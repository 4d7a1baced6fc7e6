"""python scripts/evaluate.py --help"""

import sys

from mnist_cnn.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
