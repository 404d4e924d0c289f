"""Helpers shared by tests/test_data.py and tests/test_data_sources.py."""

import ml_collections
import numpy as np

from infini_jax.data import ByteTokenizer

TOK = ByteTokenizer()


def _cfg(**kw):
    return ml_collections.ConfigDict(kw)


def _check_batch(batch, B, L):
    assert batch["tokens"].shape == (B, L) and batch["tokens"].dtype == np.int32
    assert batch["targets"].shape == (B, L) and batch["targets"].dtype == np.int32
    assert batch["loss_mask"].shape == (B, L) and batch["loss_mask"].dtype == np.float32
    assert batch["reset"].shape == (B,) and batch["reset"].dtype == bool
