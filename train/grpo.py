"""`jaxllm grpo` as a script: `python train/grpo.py [CONFIG.yaml] [section.key=value ...]`."""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["grpo", *sys.argv[1:]]))
