"""Pure tensor decompositions: weight (+ optional input weighting) -> factors."""

from rankfold.decompose._weighting import sqrt_psd
from rankfold.decompose.cp import CPFactors, cp_decompose
from rankfold.decompose.spatial_svd import SpatialSVDFactors, max_spatial_rank, spatial_svd_decompose
from rankfold.decompose.svd import SVDFactors, max_svd_rank, svd_decompose
from rankfold.decompose.tucker2 import Tucker2Factors, max_tucker2_ranks, tucker2_decompose

__all__ = [
    "CPFactors",
    "SVDFactors",
    "SpatialSVDFactors",
    "Tucker2Factors",
    "cp_decompose",
    "max_spatial_rank",
    "max_svd_rank",
    "max_tucker2_ranks",
    "spatial_svd_decompose",
    "sqrt_psd",
    "svd_decompose",
    "tucker2_decompose",
]
