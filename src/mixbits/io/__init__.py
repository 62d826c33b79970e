"""Files mixbits writes for other programs and for itself: packed checkpoints, GGUF."""
