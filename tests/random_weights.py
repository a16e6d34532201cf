"""Shared by the tests: make random weights that exercise every parameter."""

import torch


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter (upstream zero-inits some layers,
    which would make a parity test blind to them); returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + p)
    return module.eval()
