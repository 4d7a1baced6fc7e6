"""Measure speed (as ratios in one run) and accuracy: python scripts/bench.py --help"""

import sys

from mnist_cnn.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
