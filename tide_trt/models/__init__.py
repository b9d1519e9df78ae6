"""Target model loading: the embedded default (SmolLM2 GGUF, cached as safetensors) or a local HF Llama dir."""
