"""ollama-compact-server: serve compressed language models and LoRA adapters through the
Ollama and OpenAI APIs."""

__version__ = "0.1.0"
