"""Pretrain a GPT: `python train/pretrain.py [CONFIG.yaml] [section.key=value ...]`.

Same as `jaxllm pretrain`; with no arguments, nanoGPT's CPU recipe on character-level Shakespeare.
"""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
