"""`jaxllm ppo` as a script: `python train/ppo.py [CONFIG.yaml] [section.key=value ...]`."""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
