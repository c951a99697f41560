"""Export: models with adapters merged in, as Hugging Face folders (GGUF to follow)."""
