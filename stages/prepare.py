"""DVC stage `prepare`: parse IDX, carve the stratified validation and labelled splits."""
import argparse

from paramshare import config, data, paths
from paramshare.cli import guarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    cfg = config.load(parser.parse_args().params)
    meta = data.run_prepare(paths.RAW, paths.PREPARED, paths.PREPARED_META,
                            cfg.data.val_size, cfg.data.train_size, cfg.seed)
    print(f"prepare: {meta['labelled']} labelled of {meta['train_pool']} training images, "
          f"{meta['val']} validation, {meta['test']} test; digest {meta['digest'][:12]}")


if __name__ == "__main__":
    guarded(main)
