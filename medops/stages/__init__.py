"""The pipeline's stages: one package or module per stage, each ending in one ``run`` entry point."""
