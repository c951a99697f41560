"""Export: models with adapters merged in, as Hugging Face folders or GGUF files (llama.cpp, Ollama), and adapters
as GGUF LoRA files."""
