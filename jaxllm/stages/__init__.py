"""The training stages a user runs: pretraining and fine-tuning on a text corpus (here), instruction
tuning and preference learning (`jaxllm.alignment`). Each is a config, a loss and a short driver
around the one training loop; `sections` and `corpus` hold what several stages share."""
