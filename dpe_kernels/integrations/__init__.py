"""Model and engine integrations: Hugging Face (``hf``, ``baselines``) and the vLLM plugin (``vllm``).
Nothing here is imported by ``import dpe_kernels``."""
