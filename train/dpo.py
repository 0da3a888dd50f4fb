"""`jaxllm dpo` as a script: `python train/dpo.py [CONFIG.yaml] [section.key=value ...]`."""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
