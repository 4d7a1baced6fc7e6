"""python scripts/predict.py --help"""

import sys

from mnist_cnn.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
