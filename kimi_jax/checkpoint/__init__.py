"""Checkpoints: reading Hugging Face safetensors, the streaming converter to Orbax, loading
a converted checkpoint (onto one device or a mesh), and size summaries."""
