"""The main job behind `make demo` (grows with the detectors)."""
import sys


def main():
    import tensorflow as tf

    import kerasdet

    print(f"kerasdet {kerasdet.__version__} on TensorFlow {tf.__version__}")
    print("The detectors are not built yet: the demo grows with them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
