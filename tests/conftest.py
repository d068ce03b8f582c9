import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
    # A CLI run sets the process's calibration batch and graph-state headroom from its memory plan
    # (a graph fixed at batch 1 sets 1): back to the defaults, so no test sees another's.
    from rankfold.settings import DEFAULT_BATCH, use_batch, use_memory_headroom

    use_batch(DEFAULT_BATCH)
    use_memory_headroom(None)


def correlated_inputs(n: int, channels: int, *, dead: int = 0, seed: int = 0) -> torch.Tensor:
    """Rows of channel vectors with strong correlation and `dead` all-zero channels (singular)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, generator=gen) @ torch.randn(channels, channels, generator=gen)
    x = x * torch.linspace(0.1, 3.0, channels)
    if dead:
        x[:, :dead] = 0
    return x


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT sentence-encoder directory (tests.test_hf.make_encoder_dir)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.test_hf import make_encoder_dir

    return make_encoder_dir(tmp_path_factory.mktemp("minibert"))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny trained Llama directory with calibration and held-back text (tests.test_causal_lm.make_lm_dir)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.test_causal_lm import make_lm_dir

    return make_lm_dir(tmp_path_factory.mktemp("minillama"))
