"""`kerasdet export` as a script: python train/export.py --help (same code as the console command)."""
import sys

from kerasdet.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
