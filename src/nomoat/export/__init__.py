"""Export: merged models as Hugging Face folders or GGUF files (llama.cpp, Ollama); adapters as GGUF LoRA."""
