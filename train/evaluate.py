"""`kerasdet evaluate` as a script: python train/evaluate.py --help (same code as the console command)."""
import sys

from kerasdet.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
