"""`d2c_jax.adapters`: adapter forms and the check that a library fits a base model."""

from __future__ import annotations

import numpy as np
import pytest

from d2c_jax.adapters import as_single_adapter, check_adapter_for_base, is_dense, num_stacked
from d2c_jax.models.identity import BaseModelWarning


def test_adapter_for_another_base(tiny_base, make_lora, make_tiny_config):
    class Lib:
        params = make_lora(tiny_base.config, n=1)
        base_model = "someone/other-model"

    with pytest.warns(BaseModelWarning, match="'someone/other-model', which cannot be read"):
        check_adapter_for_base(tiny_base, Lib)  # an unreadable recorded base: names warn
    Lib.base_model = "org/TINY-LLAMA"  # same repo name, case-insensitive
    check_adapter_for_base(tiny_base, Lib)
    Lib.params = make_lora(make_tiny_config(hidden_size=32, head_dim=8), n=1)
    with pytest.raises(ValueError, match="does not fit"):
        check_adapter_for_base(tiny_base, Lib)


def test_a_readable_recorded_base_is_compared_by_weights(
    tiny_base, tiny_hf_dir, make_lora, make_tiny_base
):
    class Lib:
        params = make_lora(tiny_base.config, n=1)
        base_model = str(tiny_hf_dir)  # tiny_base's weights, another name

    check_adapter_for_base(tiny_base, Lib)
    other = make_tiny_base(seed=1)  # same name "tiny-llama", other weights
    with pytest.raises(ValueError, match=r"fingerprint \w+\), but .* a different model"):
        check_adapter_for_base(other, Lib)


def test_as_single_adapter_forms(tiny_base, make_lora):
    lora = make_lora(tiny_base.config)
    assert as_single_adapter(None) == (None, 1.0)
    assert as_single_adapter(lora, 2.0) == (lora, 2.0)
    assert as_single_adapter((lora, 0.5)) == (lora, 0.5)
    with pytest.raises(ValueError, match="needs its scale"):
        as_single_adapter(lora)
    dense = {m: {"delta": np.zeros((2, 3, 3), np.float32)} for m in lora}
    assert is_dense(dense) and not is_dense(lora)
    assert as_single_adapter(dense) == (dense, 1.0)

    class Lib:
        params = make_lora(tiny_base.config, n=1)
        scale = np.array([4.0])

    params, scale = as_single_adapter(Lib)
    assert scale == 4.0 and params["q_proj"]["A"].shape == Lib.params["q_proj"]["A"].shape[1:]
    Lib.params = make_lora(tiny_base.config, n=3)
    assert num_stacked(Lib.params) == 3
    with pytest.raises(ValueError, match="library of 3"):
        as_single_adapter(Lib)
