"""Serve a trained CNN (draw-a-digit page, POST /predict): python scripts/serve.py --help"""

import sys

from mnist_cnn.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
