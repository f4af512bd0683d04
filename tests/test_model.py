"""Model presets: sizes derived from the dimensions must match the published parameter counts."""

import pytest

from moesim.errors import PresetError
from moesim.model import PRESETS, get_model

# (total, active) parameters as published by each model's authors, in billions
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),  # Mistral AI, "Mixtral of Experts" (arXiv 2401.04088)
    "deepseek-v2-lite": (15.7, 2.4),  # DeepSeek-V2 paper, appendix (V2-Lite)
    "deepseek-v3": (671.0, 37.0),  # DeepSeek-V3 technical report (without the MTP module)
    "qwen3-30b-a3b": (30.5, 3.3),  # Qwen3 model card
    "olmoe-1b-7b": (6.9, 1.3),  # OLMoE paper (arXiv 2409.02060)
    "gpt-oss-120b": (116.8, 5.1),  # gpt-oss model card
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_publications(name):
    total, active = PUBLISHED[name]
    m = get_model(name)
    assert m.total_params() / 1e9 == pytest.approx(total, rel=0.03)
    # conventions differ on whether embeddings count as active; allow for one embedding table
    assert m.active_params() / 1e9 == pytest.approx(active, rel=0.15)


def test_mixtral_expert_bytes_closed_form():
    # three 4096 x 14336 matrices in bf16
    assert get_model("mixtral-8x7b").expert_bytes() == 3 * 4096 * 14336 * 2


def test_deepseek_v3_structure():
    m = get_model("dsv3")
    assert (m.moe_layers, m.num_experts, m.top_k, m.shared_experts) == (58, 256, 8, 1)
    assert (m.n_group, m.topk_group, m.router) == (8, 4, "sigmoid")
    # MLA caches the compressed latent plus the rope key: (512 + 64) values per layer
    assert m.kv_bytes_per_token() == 61 * 576 * 2


def test_every_preset_names_its_source():
    for m in PRESETS.values():
        assert m.source, m.name
        assert m.top_k <= m.num_experts


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(PresetError, match="unknown model preset 'gpt-5'.*mixtral-8x7b"):
        get_model("gpt-5")


def test_overrides():
    assert get_model("mixtral-8x7b", num_layers=2).num_layers == 2
