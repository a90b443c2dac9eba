"""The request level: continuous batching over a paged latent KV cache (see DESIGN.md)."""
