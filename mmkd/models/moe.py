"""Sparse upcycling of a dense causal LM into a transformers Qwen2-MoE model, and router losses from gate hooks.

Upcycling (Komatsuzaki et al., 2022; LLaVA-MoD): every expert starts as a copy of the dense MLP, the router is
new. With ``norm_topk_prob=True`` the top-k weights sum to one, so identical experts give exactly the dense
output whatever the router says -- the upcycled model starts where the dense one was.

Router losses are computed here from the gate logits captured by forward hooks, because Llava's output class
cannot carry ``router_logits`` (``output_router_logits=True`` fails inside Llava's forward and generate).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Qwen2MoeConfig, Qwen2MoeForCausalLM

# Dense families whose decoder layer is (RMSNorm, attention with q/k/v/o projections, RMSNorm, SwiGLU MLP),
# i.e. exactly Qwen2-MoE's layer once its MLP is swapped for experts.
_DENSE_TYPES = ("qwen2", "llama", "mistral", "qwen3")

Z_LOSS_KEY = "router_z_loss_coef"
# How the router losses of the MoE layers combine: "mean" (mmkd's default) or "sum" (LLaVA-MoD's official code,
# ``router_aux_loss_coef * sum(moe_losses)``). A custom config attribute like Z_LOSS_KEY: a reloaded student keeps it.
ROUTER_REDUCTION_KEY = "router_layer_reduction"
LAYER_REDUCTIONS = ("mean", "sum")


class RouterLossCollector:
    """Collects router logits from every MoE gate during a forward pass and turns them into ``aux_loss``.

    Hooks fire only between :meth:`start` and :meth:`finish`, so ``generate`` and gradient-checkpoint
    recomputation leave nothing behind.

    Args:
        model: Module holding Qwen2-MoE gates (``*TopKRouter`` modules whose output starts with the logits).
        num_experts: Experts per MoE layer.
        top_k: Experts used per token.
        aux_coef: Weight of the load-balancing loss.
        z_coef: Weight of the router z-loss.
        layer_reduction: ``"mean"`` or ``"sum"`` of each loss over the MoE layers.
    """

    def __init__(
        self,
        model: nn.Module,
        num_experts: int,
        top_k: int,
        aux_coef: float,
        z_coef: float,
        layer_reduction: str = "mean",
    ) -> None:
        self.num_experts, self.top_k, self.aux_coef, self.z_coef = num_experts, top_k, aux_coef, z_coef
        self.layer_reduction = _check_layer_reduction(layer_reduction)
        self._logits: list[Tensor] = []
        self._active = False
        self.gates = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
        self._handles = [g.register_forward_hook(self._hook) for g in self.gates]

    @classmethod
    def attach(cls, model: nn.Module, text_config: Any) -> RouterLossCollector | None:
        """A collector for ``model`` when ``text_config`` describes an MoE LM, else None."""
        if not getattr(text_config, "num_experts", 0):
            return None
        collector = cls(
            model,
            text_config.num_experts,
            text_config.num_experts_per_tok,
            float(getattr(text_config, "router_aux_loss_coef", 0.0)),
            float(getattr(text_config, Z_LOSS_KEY, 0.0)),
            str(getattr(text_config, ROUTER_REDUCTION_KEY, "mean")),
        )
        return collector if collector.gates else None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._active:
            self._logits.append(output[0] if isinstance(output, tuple) else output)

    def start(self) -> None:
        self._logits, self._active = [], True

    def finish(self, attention_mask: Tensor | None = None) -> Tensor | None:
        """Weighted load-balancing + z-loss over the layers seen since :meth:`start`; None when no gate ran."""
        self._active = False
        logits, self._logits = self._logits, []
        if not logits:
            return None
        mask = None if attention_mask is None else attention_mask.reshape(-1).float()
        loss = logits[0].new_zeros((), dtype=torch.float32)
        reduction = self.layer_reduction
        if self.aux_coef:
            loss = loss + self.aux_coef * load_balancing_loss(logits, self.num_experts, self.top_k, mask, reduction)
        if self.z_coef:
            loss = loss + self.z_coef * router_z_loss(logits, mask, reduction)
        return loss

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _check_layer_reduction(reduction: str) -> str:
    if reduction not in LAYER_REDUCTIONS:
        raise ValueError(f"router_layer_reduction={reduction!r}: expected one of {', '.join(LAYER_REDUCTIONS)}")
    return reduction


def _reduce_layers(losses: list[Tensor], reduction: str) -> Tensor:
    stacked = torch.stack(losses)
    return stacked.sum() if reduction == "sum" else stacked.mean()


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None or mask.numel() != x.shape[0]:
        return x.mean(0)
    m = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return (x * m).sum(0) / m.sum().clamp_min(1.0)


def load_balancing_loss(
    logits: list[Tensor],
    num_experts: int,
    top_k: int,
    mask: Tensor | None = None,
    layer_reduction: str = "mean",
) -> Tensor:
    """Switch-Transformer load balancing, ``E * sum_e f_e * P_e``, averaged (or summed) over layers.

    Args:
        logits: One ``(tokens, E)`` tensor per MoE layer.
        num_experts: E.
        top_k: Experts chosen per token (f_e counts top-k assignments, divided by k so f sums to one).
        mask: ``(tokens,)`` 1 on real tokens, or None.
        layer_reduction: ``"mean"`` over layers, or ``"sum"`` (LLaVA-MoD's official code).

    Returns:
        Scalar; 1.0 per layer for perfectly balanced routing.
    """
    losses = []
    for layer in logits:
        probs = layer.float().softmax(-1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0 / top_k)
        losses.append(num_experts * (_masked_mean(chosen, mask) * _masked_mean(probs, mask)).sum())
    return _reduce_layers(losses, _check_layer_reduction(layer_reduction))


def router_z_loss(logits: list[Tensor], mask: Tensor | None = None, layer_reduction: str = "mean") -> Tensor:
    """ST-MoE router z-loss, mean of ``logsumexp(logits)^2`` over tokens, averaged (or summed) over layers."""
    losses = [_masked_mean(layer.float().logsumexp(-1).square(), mask) for layer in logits]
    return _reduce_layers(losses, _check_layer_reduction(layer_reduction))


@contextlib.contextmanager
def quiet_empty_init() -> Iterator[None]:
    """Silence torch's warning about initialising the (intentionally) zero-width shared expert."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        yield


def _moe_layers(num_layers: int, every: int, first_moe_layer: int | None) -> list[int]:
    """0-based indices of the MoE layers: ``first, first + every, ...``; ``first`` defaults to ``every - 1``."""
    first = every - 1 if first_moe_layer is None else first_moe_layer
    return list(range(first, num_layers, every))


def _moe_config(
    dense: Any,
    num_experts: int,
    top_k: int,
    every: int,
    aux: float,
    z: float,
    first_moe_layer: int | None = None,
    router_layer_reduction: str = "mean",
) -> Qwen2MoeConfig:
    if dense.model_type not in _DENSE_TYPES:
        raise ValueError(
            f"upcycle_to_moe: cannot upcycle a {dense.model_type!r} LM; expected one of {', '.join(_DENSE_TYPES)}"
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"upcycle_to_moe: top_k={top_k} must be between 1 and num_experts={num_experts}")
    if every < 1:
        raise ValueError(f"upcycle_to_moe: every={every} must be >= 1")
    layers = dense.num_hidden_layers
    if first_moe_layer is not None and not 0 <= first_moe_layer < layers:
        raise ValueError(f"upcycle_to_moe: first_moe_layer={first_moe_layer} must be between 0 and {layers - 1}")
    _check_layer_reduction(router_layer_reduction)
    # Qwen2-MoE's own rule puts experts on layers every-1, 2*every-1, ... (decoder_sparse_step); any other placement
    # is its mlp_only_layers list (a standard config field: the saved model reloads in plain transformers).
    moe_layers = _moe_layers(layers, every, first_moe_layer)
    if first_moe_layer is None or first_moe_layer == every - 1:
        sparse_step, mlp_only = every, []
    else:
        sparse_step, mlp_only = 1, [i for i in range(layers) if i not in moe_layers]
    if getattr(dense, "mlp_bias", False) or getattr(dense, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError("upcycle_to_moe: the dense MLP must be a bias-free SwiGLU (silu) as in Qwen2/Llama")
    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    qkv_bias = dense.model_type == "qwen2" or bool(getattr(dense, "attention_bias", False))
    rope = getattr(dense, "rope_parameters", None)
    cfg = Qwen2MoeConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps,
        tie_word_embeddings=bool(getattr(dense, "tie_word_embeddings", False)),
        rope_parameters=dict(rope) if rope else None,
        attention_dropout=getattr(dense, "attention_dropout", 0.0),
        # Expert width equal to the dense MLP, no shared expert, renormalised top-k: the conditions under which
        # identical experts reproduce the dense model exactly.
        decoder_sparse_step=sparse_step,
        mlp_only_layers=mlp_only,
        moe_intermediate_size=dense.intermediate_size,
        shared_expert_intermediate_size=0,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        output_router_logits=False,
        router_aux_loss_coef=aux,
        qkv_bias=qkv_bias,
        pad_token_id=dense.pad_token_id,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
    )
    cfg.head_dim = head_dim
    setattr(cfg, Z_LOSS_KEY, z)
    setattr(cfg, ROUTER_REDUCTION_KEY, router_layer_reduction)
    return cfg


@torch.no_grad()
def upcycle_causal_lm(
    dense: PreTrainedModel,
    num_experts: int,
    top_k: int,
    every: int,
    aux: float,
    z: float,
    *,
    first_moe_layer: int | None = None,
    router_layer_reduction: str = "mean",
) -> nn.Module:
    """The Qwen2-MoE upcycling of a dense causal LM; arguments as :func:`upcycle_to_moe`."""
    cfg = _moe_config(dense.config, num_experts, top_k, every, aux, z, first_moe_layer, router_layer_reduction)
    cfg._attn_implementation = dense.config._attn_implementation
    with quiet_empty_init():
        moe = Qwen2MoeForCausalLM(cfg).to(dense.dtype)
    src = dense.state_dict()
    dst = moe.state_dict()
    new: dict[str, Tensor] = {}
    for name in dst:
        if name in src:
            new[name] = src[name]
    for i, layer in enumerate(moe.model.layers):
        prefix = f"model.layers.{i}.mlp."
        if not hasattr(layer.mlp, "experts"):
            continue
        gate, up, down = (src[f"{prefix}{p}_proj.weight"] for p in ("gate", "up", "down"))
        # Fused experts: gate_up_proj is (E, 2I, H) with gate rows first, down_proj (E, H, I).
        new[prefix + "experts.gate_up_proj"] = torch.cat([gate, up], 0).unsqueeze(0).repeat(num_experts, 1, 1)
        new[prefix + "experts.down_proj"] = down.unsqueeze(0).repeat(num_experts, 1, 1).contiguous()
        new[prefix + "gate.weight"] = dst[prefix + "gate.weight"]  # fresh router (already initialised)
        for k in dst:
            if k.startswith(prefix + "shared_expert"):
                new[k] = dst[k]  # zero-width shared expert: empty tensors
    missing = [k for k in dst if k not in new]
    if missing:
        raise ValueError(f"upcycle_to_moe: dense weights do not cover {missing[:3]} (unsupported layout)")
    moe.load_state_dict(new, strict=True)
    moe.generation_config = copy.deepcopy(dense.generation_config)
    return moe


def upcycle_to_moe(
    model: Any,
    num_experts: int,
    top_k: int,
    every: int = 1,
    router_aux_loss_coef: float = 0.01,
    z_loss_coef: float = 0.0,
    *,
    first_moe_layer: int | None = None,
    router_layer_reduction: str = "mean",
) -> Any:
    """Turn a dense causal LM (or the LM inside an MLLMStudent) into a Qwen2-MoE by sparse upcycling.

    Args:
        model: A dense transformers causal LM (Qwen2, Llama, Mistral, Qwen3) or an ``MLLMStudent``.
        num_experts: Experts per MoE layer, each a copy of the dense MLP.
        top_k: Experts per token (weights renormalised to sum to one).
        every: MoE on every ``every``-th layer, dense MLP elsewhere. By default on the 0-based layers
            ``every−1, 2·every−1, ...`` (1: all layers; 2: layers 1, 3, 5, ...; Qwen2-MoE's ``decoder_sparse_step``).
        router_aux_loss_coef: Weight of the load-balancing loss in ``ModelOutput.aux_loss``.
        z_loss_coef: Weight of the router z-loss in ``ModelOutput.aux_loss``.
        first_moe_layer: The first MoE layer (0-based): MoE on ``first, first + every, ...``. LLaVA-MoD's
            ``moe_mode="sparse"`` is ``every=2, first_moe_layer=0`` (layers 0, 2, 4, ...). None keeps the default
            above.
        router_layer_reduction: ``"mean"`` (default) or ``"sum"`` (LLaVA-MoD) of the router losses over the MoE
            layers; stored in the text config, so a reloaded model keeps it.

    Returns:
        A ``Qwen2MoeForCausalLM`` for a bare LM, or the same ``MLLMStudent`` with its LM replaced.
    """
    if hasattr(model, "upcycle_language_model"):
        return model.upcycle_language_model(num_experts, top_k, every, router_aux_loss_coef, z_loss_coef,
                                            first_moe_layer=first_moe_layer,
                                            router_layer_reduction=router_layer_reduction)
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"upcycle_to_moe: expected a transformers causal LM or MLLMStudent, got {type(model).__name__}"
        )
    return upcycle_causal_lm(model, num_experts, top_k, every, router_aux_loss_coef, z_loss_coef,
                       first_moe_layer=first_moe_layer, router_layer_reduction=router_layer_reduction)


class UpcycleToMoE:
    """Recipe-friendly transform: ``UpcycleToMoE(4, 2, every=2)(student) -> student`` with an MoE language model.

    Args:
        num_experts: Experts per MoE layer.
        top_k: Experts per token.
        every: MoE on every ``every``-th layer.
        router_aux_loss_coef: Load-balancing loss weight.
        z_loss_coef: Router z-loss weight.
        first_moe_layer: The first MoE layer (LLaVA-MoD: 0 with ``every=2``); None: ``every - 1``.
        router_layer_reduction: ``"mean"`` or ``"sum"`` (LLaVA-MoD) of the router losses over the MoE layers.
    """

    def __init__(
        self,
        num_experts: int = 4,
        top_k: int = 2,
        every: int = 1,
        router_aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        first_moe_layer: int | None = None,
        router_layer_reduction: str = "mean",
    ) -> None:
        self.num_experts, self.top_k, self.every = num_experts, top_k, every
        self.router_aux_loss_coef, self.z_loss_coef = router_aux_loss_coef, z_loss_coef
        self.first_moe_layer, self.router_layer_reduction = first_moe_layer, _check_layer_reduction(
            router_layer_reduction)

    def __call__(self, student: Any) -> Any:
        return upcycle_to_moe(
            student, self.num_experts, self.top_k, self.every, self.router_aux_loss_coef, self.z_loss_coef,
            first_moe_layer=self.first_moe_layer, router_layer_reduction=self.router_layer_reduction,
        )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and active (per token) parameter counts of a model, MoE or dense.

    Active counts every non-expert parameter plus ``top_k / num_experts`` of each fused expert tensor.

    Returns:
        ``{"total": int, "active": int}``.
    """
    top_k = next((int(m.top_k) for m in model.modules() if type(m).__name__.endswith("TopKRouter")), 1)
    total = active = 0
    seen: set[int] = set()  # tied weights count once
    for m in model.modules():
        is_experts = type(m).__name__.endswith("Experts")
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            active += p.numel() * top_k // p.shape[0] if is_experts and p.dim() == 3 else p.numel()
    return {"total": total, "active": active}
