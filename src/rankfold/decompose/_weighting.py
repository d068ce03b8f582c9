"""Input weighting shared by the data-aware decompositions.

A data-aware decomposition minimises ||(W - W~) S||_F over the input-channel mode, where
S = Sigma^(1/2) and Sigma is the second moment of the layer's input channels. Minimising the
weighted error is the same as minimising the expected output error E||(W - W~) x||^2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Eigenvalues below this fraction of the largest are lifted to it: calibration covariances
# are often singular (dead ReLU channels, constant padding), and the weighting must stay
# invertible so that full rank still reproduces the layer exactly.
DEFAULT_REL_EPS = 1e-6


def sqrt_psd(sigma: Tensor, *, rel_eps: float = DEFAULT_REL_EPS) -> Tensor:
    """Symmetric square root of a regularised positive semi-definite matrix (float64)."""
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma must be a square matrix, got shape {tuple(sigma.shape)}")
    sym = 0.5 * (sigma + sigma.T).to(torch.float64)
    eigval, eigvec = torch.linalg.eigh(sym)
    top = float(eigval.max().clamp_min(0.0))
    floor = max(top * rel_eps, 1e-30)
    root = eigval.clamp_min(floor).sqrt()
    return (eigvec * root) @ eigvec.T


def mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """Contract `tensor`'s axis `mode` with the first axis of `matrix` (n-mode product)."""
    moved = tensor.movedim(mode, -1)
    return (moved @ matrix).movedim(-1, mode)


class MatrixFactors(NamedTuple):
    """A rank-r split of a (rows, I, *spatial) tensor: tensor ~= last @ first."""

    first: Tensor  # (r, I, *spatial): applied to the input
    last: Tensor  # (rows, r)


def top_left_vectors(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The `rank` leading left singular vectors and singular values of `matrix`."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank]


def low_rank_rows(tensor: Tensor, rank: int, input_sqrt: Tensor | None = None) -> MatrixFactors:
    """Best rank-`rank` approximation of `tensor` (rows, I, *s) seen as a rows x (I*s) matrix.

    With `input_sqrt` (S, I x I) the error is weighted on the input mode: the optimum of
    ||(M - M~)(S kron Id)|| is U_r U_r^T M with U_r the leading left singular vectors of M S, so
    no inverse of S is ever needed.
    """
    weighted = tensor if input_sqrt is None else mode_product(tensor, input_sqrt, 1)
    basis, _ = top_left_vectors(weighted.reshape(tensor.shape[0], -1), rank)
    first = (basis.T @ tensor.reshape(tensor.shape[0], -1)).reshape(rank, *tensor.shape[1:])
    return MatrixFactors(first=first, last=basis)


class InputSubspace(NamedTuple):
    """An input-mode projection: M ~= (M @ lift) @ project."""

    project: Tensor  # (r, I): the first 1x1 layer
    lift: Tensor  # (I, r): maps the weight into the reduced input space


def input_subspace(matrix: Tensor, rank: int, input_sqrt: Tensor | None = None) -> InputSubspace:
    """Best rank-`rank` input subspace of `matrix` (rows, I) under the input weighting S.

    The optimum of ||(M - M~) S|| restricted to the input mode is M S V_r V_r^T S^-1, with V_r
    the leading right singular vectors of M S; project = V_r^T S^-1 equals Sig_r^-1 U_r^T M, which
    avoids inverting S.
    """
    if input_sqrt is None:
        _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        v = vh[:rank].T
        return InputSubspace(project=v.T, lift=v)
    u, s, vh = torch.linalg.svd(matrix @ input_sqrt, full_matrices=False)
    u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    s_safe = s.clamp_min(float(s.max()) * 1e-12 if s.numel() else 1e-30)
    project = (u.T @ matrix) / s_safe[:, None]
    return InputSubspace(project=project, lift=input_sqrt @ v)
