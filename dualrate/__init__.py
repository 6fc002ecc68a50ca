"""Dual-Rate Diffusion: a heavy context encoder run every K-th step, a light denoiser run every step."""
