"""DVC stage `train@FAMILY`: train one sharing family (tied or untied per model.tied).

The work is paramshare.train's, the module torchrun runs when train.distributed asks for it."""
from paramshare.cli import guarded
from paramshare.train import main

if __name__ == "__main__":
    guarded(main)
