"""Sparse upcycling to Qwen2-MoE: equality with the dense source, expert placement, router losses and their
reduction over layers, parameter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmkd.models import MLLMStudent, UpcycleToMoE, count_parameters, upcycle_to_moe
from mmkd.models.moe import RouterLossCollector, load_balancing_loss, quiet_empty_init, router_z_loss


def _qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


def _randomise_routers(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 3.0)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("router_seed", [0, 1])
def test_upcycled_lm_equals_dense_for_any_router(every: int, router_seed: int) -> None:
    dense = _qwen2()
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2, every=every).eval()
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    sparse = [hasattr(layer.mlp, "experts") for layer in moe.model.layers]
    assert sparse == ([True] * 4 if every == 1 else [False, True, False, True])
    _randomise_routers(moe, router_seed)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_upcycles_llama_without_qkv_bias() -> None:
    torch.manual_seed(0)
    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    ).eval()
    moe = upcycle_to_moe(dense, 3, 1).eval()
    assert moe.config.qkv_bias is False
    _randomise_routers(moe, 3)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_active_parameter_count() -> None:
    dense = _qwen2()
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2, every=2)
    d, m = count_parameters(dense), count_parameters(moe)
    assert d["total"] == d["active"] == sum(p.numel() for p in dense.parameters())
    mlp = 3 * 32 * 64  # one SwiGLU MLP
    router, shared_gate = 4 * 32, 32  # per MoE layer (the shared expert has zero width)
    assert m["total"] == d["total"] + 2 * (3 * mlp + router + shared_gate)  # two MoE layers, four experts each
    assert m["active"] == d["total"] + 2 * (1 * mlp + router + shared_gate)  # top-2: one extra MLP per MoE layer
    print(f"dense {d['total']:,} params; MoE 4x top-2 every 2nd layer: {m['total']:,} total, {m['active']:,} active")


def test_saved_moe_reloads_with_transformers(tmp_path) -> None:
    dense = _qwen2()
    moe = upcycle_to_moe(dense, 4, 2, router_aux_loss_coef=0.02, z_loss_coef=0.001)
    moe.save_pretrained(tmp_path)
    with quiet_empty_init():
        back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.router_aux_loss_coef == 0.02 and back.config.router_z_loss_coef == 0.001
    assert back.config.output_router_logits is False
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_router_losses_from_gate_hooks_match_formulas() -> None:
    moe = upcycle_to_moe(_qwen2(), 4, 2, every=1, router_aux_loss_coef=0.01, z_loss_coef=0.001)
    _randomise_routers(moe, 0)
    collector = RouterLossCollector.attach(moe, moe.config)
    assert len(collector.gates) == 4
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    collector.start()
    moe(ids, attention_mask=mask)
    logits = list(collector._logits)
    aux = collector.finish(mask)
    assert len(logits) == 4 and logits[0].shape == (12, 4)
    flat = mask.reshape(-1).float()
    expected = 0.01 * load_balancing_loss(logits, 4, 2, flat) + 0.001 * router_z_loss(logits, flat)
    torch.testing.assert_close(aux, expected)
    # Outside start()/finish() (e.g. generate) nothing is collected.
    moe(ids)
    assert collector._logits == [] and collector.finish() is None


def test_load_balancing_loss_values() -> None:
    # Uniform router probabilities: perfectly balanced in expectation, loss 1.
    assert float(load_balancing_loss([torch.zeros(8, 4)], 4, 2)) == pytest.approx(1.0)
    # Every token routed to experts 0 and 1 with all mass there: E * (0.5*0.5 + 0.5*0.5) = 2.
    collapsed = torch.tensor([[10.0, 10.0, -10.0, -10.0]]).repeat(8, 1)
    assert float(load_balancing_loss([collapsed], 4, 2)) == pytest.approx(2.0, abs=1e-3)
    # Padding rows are ignored.
    mixed = torch.cat([torch.zeros(4, 4), collapsed[:4]])
    assert float(load_balancing_loss([mixed], 4, 2, torch.tensor([1.0] * 4 + [0.0] * 4))) == pytest.approx(1.0)
    # z-loss: logsumexp of zeros over 4 experts is log 4.
    assert float(router_z_loss([torch.zeros(3, 4)])) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_upcycled_mllm_student_equals_dense_and_has_aux_loss(tiny_dirs, batch) -> None:
    student = MLLMStudent.from_pretrained(tiny_dirs["mllm-student"])
    with torch.no_grad():
        ref = student(**batch).logits()
    upcycled = UpcycleToMoE(num_experts=4, top_k=2, every=2, router_aux_loss_coef=0.01)(student)
    assert upcycled is student
    assert upcycled.hf.config.text_config.model_type == "qwen2_moe"
    assert set(upcycled.parts()) == {"vision_tower", "projector", "language_model", "ffn", "experts", "router"}
    _randomise_routers(upcycled, 7)
    out = upcycled(**batch)
    torch.testing.assert_close(out.logits(), ref, rtol=1e-5, atol=1e-5)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    out.aux_loss.backward()
    router = upcycled.parts()["router"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)


def test_saved_moe_student_round_trip(tiny_dirs, batch) -> None:
    a = MLLMStudent.from_pretrained(tiny_dirs["moe-student"])
    out = a(**batch)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert a.hf.config.text_config.num_experts == 4


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        upcycle_to_moe(_qwen2(), 4, 5)
    with pytest.raises(ValueError, match="expected a transformers causal LM"):
        upcycle_to_moe(torch.nn.Linear(2, 2), 4, 2)


@pytest.mark.parametrize("router_seed", [0, 1])
def test_experts_on_even_layers_reload_in_plain_transformers_and_equal_dense(tmp_path, router_seed) -> None:
    # LLaVA-MoD's moe_mode="sparse": moe_layers_idx = range(num_layers)[::2] -> layers 0, 2.
    dense = _qwen2()
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2, every=2, first_moe_layer=0).eval()
    assert [hasattr(layer.mlp, "experts") for layer in moe.model.layers] == [True, False, True, False]
    assert moe.config.mlp_only_layers == [1, 3] and moe.config.decoder_sparse_step == 1
    _randomise_routers(moe, router_seed)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    moe.save_pretrained(tmp_path)
    with quiet_empty_init():
        back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "Qwen2MoeForCausalLM"
    assert [hasattr(layer.mlp, "experts") for layer in back.model.layers] == [True, False, True, False]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    # Any offset: every third layer from layer 0 -> layers 0 and 3.
    assert [hasattr(m.mlp, "experts") for m in upcycle_to_moe(_qwen2(), 2, 1, every=3, first_moe_layer=0)
            .model.layers] == [True, False, False, True]
    # The default placement is Qwen2-MoE's decoder_sparse_step rule, unchanged.
    default = upcycle_to_moe(_qwen2(), 4, 2, every=2)
    assert default.config.mlp_only_layers == [] and default.config.decoder_sparse_step == 2
    assert upcycle_to_moe(_qwen2(), 4, 2, every=2, first_moe_layer=1).config.to_dict() == default.config.to_dict()


def _layer_summed_reference(logits, mask, num_experts, top_k, aux, z):
    """LLaVA-MoD's reduction, written out: coef * Σ_layers of each layer's loss (Switch balance, ST-MoE z)."""
    keep = [i for i, m in enumerate(mask.reshape(-1).tolist()) if m]
    balance = zloss = 0.0
    for layer in logits:
        rows = layer.detach().float()[keep]
        probs = rows.softmax(-1)
        f = [0.0] * num_experts
        for token in probs:
            for e in token.topk(top_k).indices.tolist():
                f[e] += 1.0 / (top_k * len(keep))
        p = probs.mean(0).tolist()
        balance += num_experts * sum(fe * pe for fe, pe in zip(f, p))
        zloss += sum(float(torch.logsumexp(token, 0)) ** 2 for token in rows) / len(keep)
    return aux * balance + z * zloss


def test_router_losses_summed_over_layers_survive_a_reload(tmp_path) -> None:
    moe = upcycle_to_moe(_qwen2(), 4, 2, every=1, router_aux_loss_coef=0.01, z_loss_coef=0.001,
                         router_layer_reduction="sum")
    _randomise_routers(moe, 5)
    moe.save_pretrained(tmp_path)
    with quiet_empty_init():
        back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.router_layer_reduction == "sum"
    collector = RouterLossCollector.attach(back, back.config)
    assert collector.layer_reduction == "sum"
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(8))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    collector.start()
    with torch.no_grad():
        back(ids, attention_mask=mask)
    logits = list(collector._logits)
    summed = collector.finish(mask)
    assert len(logits) == 4
    expected = _layer_summed_reference(logits, mask, 4, 2, 0.01, 0.001)
    assert summed.item() == pytest.approx(expected, rel=1e-5)
    # The mean (default) is that divided by the number of MoE layers.
    flat = mask.reshape(-1).float()
    mean = 0.01 * load_balancing_loss(logits, 4, 2, flat) + 0.001 * router_z_loss(logits, flat)
    assert mean.item() == pytest.approx(expected / 4, rel=1e-5)
    # A student upcycled before the option existed has no attribute: the mean.
    assert RouterLossCollector.attach(moe, moe.config).layer_reduction == "sum"
    plain = upcycle_to_moe(_qwen2(), 4, 2)
    delattr(plain.config, "router_layer_reduction")
    assert RouterLossCollector.attach(plain, plain.config).layer_reduction == "mean"


def test_placement_and_reduction_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="first_moe_layer=4 must be between 0 and 3"):
        upcycle_to_moe(_qwen2(), 4, 2, first_moe_layer=4)
    with pytest.raises(ValueError, match="router_layer_reduction='max': expected one of mean, sum"):
        upcycle_to_moe(_qwen2(), 4, 2, router_layer_reduction="max")
    with pytest.raises(ValueError, match="router_layer_reduction='max'"):
        UpcycleToMoE(router_layer_reduction="max")


def test_the_ffn_part_is_every_feed_forward_projection_of_the_lm(tiny_dirs):
    """LLaVA-MoD trains the dense layers' MLPs and the experts (plus routers and projector): the ``ffn`` part."""
    from mmkd.models import MLLMStudent, UpcycleToMoE

    student = UpcycleToMoE(4, 2, every=2, first_moe_layer=0)(MLLMStudent.from_pretrained(tiny_dirs["mllm-student"]))
    parts = student.parts()
    names = {id(p): n for n, p in student.hf.named_parameters()}
    ffn = {names[id(p)] for p in parts["ffn"]}
    # an independent count from the parameter names: every .mlp. weight of the language model but the routers
    expected = {n for n in names.values()
                if "language_model" in n and ".mlp." in n and not n.endswith(".mlp.gate.weight")}
    assert ffn == expected
    assert any("experts" in n for n in ffn) and any(n.endswith("mlp.gate_proj.weight") for n in ffn)  # both kinds
    assert not any("self_attn" in n or "norm" in n or "vision" in n or "projector" in n for n in ffn)
    ffn_ids = {id(p) for p in parts["ffn"]}
    assert ffn_ids <= {id(p) for p in parts["language_model"] + parts["experts"]}  # a view over them
    # what LLaVA-MoD's sparse stages train, counted from the names: projector + feed-forward layers + routers
    trained = {id(p): p for part in ("projector", "ffn", "router") for p in parts[part]}
    by_name = sum(p.numel() for n, p in student.hf.named_parameters()
                  if n in expected or "multi_modal_projector" in n or n.endswith(".mlp.gate.weight"))
    assert sum(p.numel() for p in trained.values()) == by_name
