"""Checkpoint converters: Hugging Face targets (hf.py) and DeepSpec drafts; key maps live in names.py."""
