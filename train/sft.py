"""Instruction tuning (SFT): `python train/sft.py [CONFIG.yaml] [section.key=value ...]`.

Same as `jaxllm sft`; with no arguments, a small model from scratch on the synthetic tasks (CPU).
"""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
