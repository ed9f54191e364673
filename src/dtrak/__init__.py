"""dtrak: data attribution for diffusion models."""
