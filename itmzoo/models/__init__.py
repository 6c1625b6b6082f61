"""Model families, one module each; imported lazily through the registry."""
