"""Train the MNIST CNN: python scripts/fit.py --help"""

import sys

from mnist_cnn.cli.fit import main

if __name__ == "__main__":
    sys.exit(main())
