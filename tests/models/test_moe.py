"""Sparse upcycling to Qwen2-MoE: equality with the dense source, router losses, parameter counts."""

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
    assert set(upcycled.parts()) == {"vision_tower", "projector", "language_model", "experts", "router"}
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
