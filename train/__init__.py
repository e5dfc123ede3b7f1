"""Ray Train + DeepSpeed apps: tokenizer training, LLM pretraining, super-resolution, and the demo."""
