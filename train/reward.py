"""`jaxllm reward` as a script: `python train/reward.py [CONFIG.yaml] [section.key=value ...]`."""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["reward", *sys.argv[1:]]))
