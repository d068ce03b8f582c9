"""Tucker-2: 1x1 (I -> r_in), the KxK core (r_in -> r_out), 1x1 (r_out -> O)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from rankfold.config import VBMF, Tucker2Config
from rankfold.decompose import max_tucker2_ranks, tucker2_decompose
from rankfold.decompose._weighting import mode_product
from rankfold.decompose.vbmf import evbmf_rank
from rankfold.layers import LayerSpec, LowRank, conv_like, pointwise
from rankfold.methods.base import Factorized, Rank, copy_bias, weighted_weight


class Tucker2Method:
    name = "tucker2"
    config_type = Tucker2Config
    rank_count = 2
    auto_max_work = None

    def config(self, ranks):
        return Tucker2Config(ranks=(ranks[0], ranks[1]))

    def vbmf_config(self) -> Tucker2Config:
        return Tucker2Config(ranks=VBMF)

    def estimate_losses(self, weight: Tensor, input_sqrt: Tensor, sensitivity: Tensor,
                        ranks: list[Rank]) -> list[float]:
        """HOSVD estimate (the HOOI sweeps that follow only lower it): with U the output-mode and V
        the input-mode singular vectors of W S, the error of row c is ||(W S)_c||^2 - ||(U U^T Z)_c||^2,
        Z = W S projected on V; both bases are nested, so every rank pair reuses one SVD each."""
        weighted = weighted_weight(weight, input_sqrt)  # (O, I, k)
        out_ch, in_ch, _taps = weighted.shape
        u_out = torch.linalg.svd(weighted.reshape(out_ch, -1), full_matrices=False)[0]
        v_in = torch.linalg.svd(weighted.permute(1, 0, 2).reshape(in_ch, -1), full_matrices=False)[0]
        coords = mode_product(weighted, v_in, 1)  # (O, I', k): coordinates in the ordered V basis
        row_norms = (weighted * weighted).sum((1, 2))
        losses = []
        for r_in, r_out in ranks:
            z = coords[:, :r_in].reshape(out_ch, -1)
            basis = u_out[:, :r_out]
            kept = basis @ (basis.T @ z)
            err = (row_norms - (kept * kept).sum(1)).clamp_min(0)
            losses.append(0.5 * float(sensitivity @ err))
        return losses

    def unsupported(self, spec: LayerSpec, layer: nn.Module) -> str | None:
        if not spec.has_spatial_kernel:
            return "tucker2 needs a spatial kernel larger than 1"
        return None

    def rank_ladder(self, spec: LayerSpec) -> list[Rank]:
        max_in, max_out = max_tucker2_ranks((spec.out_ch, spec.in_ch, *spec.kernel))
        ladder = []
        for r_out in range(1, max_out + 1):  # keep r_in / r_out close to I / O
            r_in = min(max_in, max(1, round(r_out * spec.in_ch / spec.out_ch)))
            ladder.append((r_in, r_out))
        return ladder

    def factor_params(self, spec: LayerSpec, rank: Rank) -> int:
        r_in, r_out = rank
        return spec.in_ch * r_in + r_in * r_out * spec.spatial + r_out * spec.out_ch

    def config_rank(self, config: Tucker2Config) -> Rank | str | None:
        return config.ranks

    def vbmf_rank(self, layer: nn.Module) -> Rank:
        w = layer.weight.detach().double().numpy()
        input_mode = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
        return (evbmf_rank(input_mode), evbmf_rank(w.reshape(w.shape[0], -1)))

    def skeleton(self, layer, rank) -> LowRank:
        r_in, r_out = rank
        ndim = len(layer.kernel_size)
        first = pointwise(layer, layer.in_channels, r_in, bias=False, ndim=ndim)
        core = conv_like(layer, r_in, r_out, kernel=tuple(layer.kernel_size))
        last = pointwise(layer, r_out, layer.out_channels, bias=layer.bias is not None, ndim=ndim)
        return LowRank(first, core, last, method=self.name, ranks=rank)

    def factorize(self, layer, rank, input_sqrt, config) -> Factorized:
        als_iters = config.als_iters if isinstance(config, Tucker2Config) else Tucker2Config().als_iters
        factors = tucker2_decompose(layer.weight, ranks=rank, input_sqrt=input_sqrt, als_iters=als_iters)
        built = self.skeleton(layer, rank)
        first, core, last = built
        first.weight.data.copy_(factors.first.reshape(first.weight.shape))
        core.weight.data.copy_(factors.core)
        last.weight.data.copy_(factors.last.reshape(last.weight.shape))
        copy_bias(last, layer)
        return Factorized(built, factors.rebuild())
