"""DVC stage `download`: fetch and verify the four MNIST files into data/raw.

$PARAMSHARE_MNIST_MIRROR (a directory or URL) is tried first, then torchvision's mirrors.
"""
import argparse

from paramshare import data, paths
from paramshare.cli import guarded


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    data.download(paths.RAW)


if __name__ == "__main__":
    guarded(main)
