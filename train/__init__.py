"""Training on the one engine (`train.engine`: Ray Train + DeepSpeed): the video and audio tokenizers, the LLM with the
task mixture, and super-resolution."""
