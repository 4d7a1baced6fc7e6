"""The tutorial, step by step: python scripts/reshape_demo.py --help"""

import sys

from mnist_cnn.cli.tutorial import reshape_main

if __name__ == "__main__":
    sys.exit(reshape_main())
