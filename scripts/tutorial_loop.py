"""The tutorial, step by step: python scripts/tutorial_loop.py --help"""

import sys

from mnist_cnn.cli.tutorial import loop_main

if __name__ == "__main__":
    sys.exit(loop_main())
