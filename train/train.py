"""`kerasdet train` as a script: python train/train.py --help (same code as the console command)."""
import sys

from kerasdet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
