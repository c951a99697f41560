"""Export, the end of the data flow: a base model folder plus adapter folders in, one file or folder out.

`merged.export_merged` writes a merged Hugging Face folder, `gguf.export_gguf` a merged GGUF file (llama.cpp, Ollama),
`gguf_lora.export_gguf_lora` an adapter alone as a GGUF LoRA file.
"""
