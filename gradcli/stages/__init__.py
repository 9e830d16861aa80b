"""The pipeline's stages, one module each."""
