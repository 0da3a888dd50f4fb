"""Parameter-efficient fine-tuning: `python train/lora.py [CONFIG.yaml] [section.key=value ...]`.

Same as `jaxllm lora`; with no arguments, LoRA (r=8 on q, v) on the default pretrain run.
"""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["lora", *sys.argv[1:]]))
