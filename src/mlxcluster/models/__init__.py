"""Models: GGUF import, the default demo model, the models directory."""
