import numpy as np
import pytest
import torch

from rankfold.decompose import (
    cp_decompose,
    max_spatial_rank,
    max_svd_rank,
    max_tucker2_ranks,
    spatial_svd_decompose,
    sqrt_psd,
    svd_decompose,
    tucker2_decompose,
)
from rankfold.decompose._weighting import mode_product
from tests.conftest import correlated_inputs


def weighted_error(w, approx, s):
    return float(mode_product((w - approx).double(), s, 1).norm())


def sigma_for(channels, dead=0):
    x = correlated_inputs(2000, channels, dead=dead)
    return (x.T @ x / x.shape[0]).double()


def decompose(method, w, rank, s):
    if method == "svd":
        return svd_decompose(w, rank=rank, input_sqrt=s)
    if method == "spatial":
        return spatial_svd_decompose(w, rank=rank, input_sqrt=s)
    r_in, r_out = rank if isinstance(rank, tuple) else (min(rank, w.shape[1]), min(rank, w.shape[0]))
    return tucker2_decompose(w, ranks=(r_in, r_out), input_sqrt=s, als_iters=2)


def full_rank(method, shape):
    return {"svd": max_svd_rank, "spatial": max_spatial_rank}.get(method, max_tucker2_ranks)(shape)


@pytest.mark.parametrize("method", ["svd", "tucker2", "spatial"])
@pytest.mark.parametrize("data_aware", [False, True])
def test_full_rank_reproduces_weight(method, data_aware):
    w = torch.randn(12, 6, 3, 3, dtype=torch.float64)
    s = sqrt_psd(sigma_for(6, dead=2)) if data_aware else None  # singular Sigma on purpose
    approx = decompose(method, w, full_rank(method, tuple(w.shape)), s).rebuild()
    assert float((approx - w).norm() / w.norm()) < 1e-8


@pytest.mark.parametrize("method", ["svd", "tucker2", "spatial"])
@pytest.mark.parametrize("data_aware", [False, True])
def test_error_does_not_grow_with_rank(method, data_aware):
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    s = sqrt_psd(sigma_for(8)) if data_aware else torch.eye(8, dtype=torch.float64)
    errors = [weighted_error(w, decompose(method, w, r, s if data_aware else None).rebuild(), s) for r in range(1, 9)]
    assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("method", ["svd", "tucker2", "spatial"])
@pytest.mark.parametrize("rank", [2, 4, 6])
def test_data_aware_has_no_larger_weighted_error(method, rank):
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    s = sqrt_psd(sigma_for(8, dead=1))
    plain = decompose(method, w, rank, None).rebuild()
    aware = decompose(method, w, rank, s).rebuild()
    assert weighted_error(w, aware, s) <= weighted_error(w, plain, s) * (1 + 1e-9)


def test_data_aware_cp_has_no_larger_weighted_error():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    s = sqrt_psd(sigma_for(8))
    plain = cp_decompose(w, rank=12, max_iters=200).rebuild()
    aware = cp_decompose(w, rank=12, input_sqrt=s, max_iters=200).rebuild()
    assert weighted_error(w, aware, s) <= weighted_error(w, plain, s)


def test_cp_recovers_an_exact_low_rank_tensor():
    gen = torch.Generator().manual_seed(3)
    factors = [torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in (10, 7, 3, 3)]
    w = torch.einsum("ar,br,cr,dr->abcd", *factors)
    approx = cp_decompose(w, rank=4, max_iters=500, tol=1e-14).rebuild()
    assert float((approx - w).norm() / w.norm()) < 1e-4


def test_cp_error_falls_as_rank_rises():
    w = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    errs = [float((cp_decompose(w, rank=r, max_iters=60).rebuild() - w).norm()) for r in (2, 8, 32)]
    assert errs[0] > errs[1] > errs[2]


def test_tucker2_matches_tensorly_hosvd_error():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    tl.set_backend("numpy")
    w = torch.randn(20, 12, 3, 3, dtype=torch.float64)
    ours = tucker2_decompose(w, ranks=(5, 7), als_iters=10).rebuild()
    (core, (u_out, u_in)), _ = partial_tucker(w.numpy(), rank=[7, 5], modes=[0, 1], n_iter_max=50, init="svd")
    theirs = tl.tenalg.multi_mode_dot(core, [u_out, u_in], modes=[0, 1])
    ours_err = float((ours - w).norm())
    theirs_err = float((torch.from_numpy(theirs) - w).norm())
    assert ours_err <= theirs_err * 1.001


def test_sqrt_psd_of_singular_matrix_is_finite_and_squares_back():
    sigma = sigma_for(6, dead=3)
    s = sqrt_psd(sigma)
    assert torch.isfinite(s).all()
    assert float((s @ s - sigma).norm() / sigma.norm()) < 1e-5


@pytest.mark.parametrize(
    "call",
    [
        lambda w: svd_decompose(w, rank=0),
        lambda w: svd_decompose(w, rank=10**6),
        lambda w: tucker2_decompose(w, ranks=(0, 3)),
        lambda w: spatial_svd_decompose(w[..., 0], rank=2),
        lambda w: cp_decompose(w, rank=0),
    ],
)
def test_bad_ranks_raise_value_error(call):
    with pytest.raises(ValueError):
        call(torch.randn(8, 4, 3, 3))


# -- VBMF -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [2, 9, 30])
def test_evbmf_recovers_a_planted_rank(rank):
    from rankfold.decompose.vbmf import evbmf_rank

    rng = np.random.default_rng(rank)
    signal = rng.standard_normal((90, rank)) @ rng.standard_normal((rank, 140))
    noisy = signal + 0.3 * rng.standard_normal(signal.shape)
    assert evbmf_rank(noisy) == rank and evbmf_rank(noisy.T) == rank
    assert evbmf_rank(rng.standard_normal((60, 70))) <= 2  # noise alone: (almost) nothing to keep
