"""The tutorial, step by step: python scripts/conv_demo.py --help"""

import sys

from mnist_cnn.cli.tutorial import conv_main

if __name__ == "__main__":
    sys.exit(conv_main())
