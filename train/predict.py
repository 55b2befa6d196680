"""`kerasdet predict` as a script: python train/predict.py --help (same code as the console command)."""
import sys

from kerasdet.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
