"""The unfold reference of the KAN convolution and the helpers its tests share (tests/unit and
tests/integration import it as `kan_reference`: tests/ is on sys.path through its conftest)."""

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F

from rkan_dist.models.kan_conv import KANConv2d


def power_series(polynomial: str, n: int) -> np.ndarray:
    """Coefficients (lowest power first) of P_n, from numpy/scipy rather than our recurrence."""
    if polynomial == "jacobi":
        return scipy.special.jacobi(n, 0.5, 0.5).coeffs[::-1].copy()
    family = {"chebyshev": np.polynomial.Chebyshev, "legendre": np.polynomial.Legendre,
              "hermite": np.polynomial.Hermite}[polynomial]
    return family.basis(n).convert(kind=np.polynomial.Polynomial).coef


def reference_kan_conv(x, base_weight, poly_weight, scaler, stride, polynomial, per_channel):
    """The reference code's way: unfold zero-padded 3x3 patches, tanh, polynomials, weighted sum."""
    batch, channels, height, width = x.shape
    n_convs, degree = base_weight.shape[0], poly_weight.shape[-1] - 1
    patches = F.unfold(x, kernel_size=3, padding=1, stride=stride).view(batch, channels, 9, -1)  # [B, C, t, L]
    u = torch.tanh(patches)
    basis = []
    for n in range(degree + 1):
        coefficients = power_series(polynomial, n)
        basis.append(sum(float(a) * u**p for p, a in enumerate(coefficients)) * torch.ones_like(u))
    basis = torch.stack(basis, dim=-1)  # [B, C, t, L, n]
    outputs = []
    for k in range(n_convs):
        if per_channel:
            base, poly = base_weight[k][None, :, :, None], (poly_weight[k] * scaler[k][..., None])[None, :, :, None, :]
        else:
            base, poly = base_weight[k][None, None, :, None], (poly_weight[k] * scaler[k][:, None])[None, None, :, None, :]
        outputs.append((base * patches).sum(2) + (poly * basis).sum(-1).sum(2))
    out_size = (height - 1) // stride + 1, (width - 1) // stride + 1
    return torch.cat(outputs, dim=1).view(batch, channels * n_convs, *out_size)


def randomized(conv: KANConv2d) -> KANConv2d:
    with torch.no_grad():  # scalers away from 1 so that their gradient is tested too
        conv.scaler.uniform_(0.5, 1.5)
    return conv


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
