"""Transformers: attention-aware permutation specs (heads, within-head units, residual stream), never a
silently partial spec, coverage, head-block weight matching, the zoo's ViT."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmclab.align.activation_matching import _attention_activations, activation_matching
from lmclab.align.weight_matching import head_block_assignment, weight_matching
from lmclab.cli import _alignment_report
from lmclab.models import ModelError, build_model
from lmclab.models.vit import ViT
from lmclab.permutation import Permutation, PermutationSpec, SpecError, check_invariance, derive_spec
from lmclab.permutation.spec import block_structure, coverage, structured_perm

torch.set_default_dtype(torch.float32)


def _relative_invariance(model: nn.Module, spec: PermutationSpec, perm: Permutation, x: torch.Tensor) -> dict:
    """mode -> max |f(π(θ)) − f(θ)| / max |f(θ)| on the logits, in float64."""
    diffs = check_invariance(model, spec, perm, x)
    ref = model.double()
    out = {}
    for mode in ("eval", "train"):
        ref.train(mode == "train")
        torch.manual_seed(0)
        with torch.no_grad():
            scale = float(ref(x.double()).abs().max())
        out[mode] = diffs.to_json()[mode] / scale
    return out


def _tiny_vit() -> ViT:
    torch.manual_seed(0)
    return ViT((1, 28, 28), 10, patch=7, dim=16, depth=2, heads=4, mlp_ratio=2.0)


# ------------------------------------------------------------------------------ models under test


class DropPath(nn.Module):
    """Stochastic depth: each sample's branch kept with probability 1 − p (scaled by 1/(1 − p))."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * mask / (1 - self.p)


class WrittenAttention(nn.Module):
    """Multi-head attention written out (q @ kᵀ, softmax, @ v) or through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, fused: bool, qkv: str = "") -> None:
        super().__init__()
        self.heads, self.fused, self.qkv_mode = heads, fused, qkv
        if qkv:  # one Linear for q, k and v, split into three
            self.qkv = nn.Linear(dim, 3 * dim)
            self.o = nn.Linear(dim, dim)
        else:
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if self.qkv_mode == "chunk":
            parts = self.qkv(x).chunk(3, dim=-1)
        elif self.qkv_mode == "split":
            parts = torch.split(self.qkv(x), d, dim=2)
        else:
            parts = (self.q(x), self.k(x), self.v(x))
        q, k, v = (parts[i].view(b, t, self.heads, d // self.heads).transpose(1, 2) for i in range(3))
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)).softmax(dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class SeqModel(nn.Module):
    """Token features → Linear embedding → one pre-norm block (attention + MLP) → mean → head."""

    def __init__(self, fused: bool = False, drop_path: float = 0.0, odd_op: bool = False, qkv: str = "") -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.norm1 = nn.LayerNorm(16)
        self.attn = WrittenAttention(16, 4, fused, qkv)
        self.norm2 = nn.RMSNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.drop = DropPath(drop_path)
        self.head = nn.Linear(16, 3)
        self.odd_op = odd_op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.drop(self.attn(self.norm1(x)))
        h = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        if self.odd_op:
            h = torch.cumsum(h, dim=-1)  # not equivariant along the units: inside the residual branch
        x = x + self.drop(h)
        return self.head(x.mean(1))


class EncoderModel(nn.Module):
    """Linear embedding → nn.TransformerEncoderLayer (or an nn.TransformerEncoder of two) → head on token 0."""

    def __init__(self, stack: bool = False, dropout: float = 0.1, norm_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(16, 4, 32, dropout=dropout, batch_first=True, norm_first=norm_first)

        self.encoder: nn.Module = (
            nn.TransformerEncoder(layer(), 2, norm=nn.LayerNorm(16), enable_nested_tensor=False) if stack else layer()
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x))[:, 0])


def _seq_input() -> torch.Tensor:
    return torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ specs and coverage


def test_vit_spec_heads_stream_and_coverage() -> None:
    model = _tiny_vit()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    spec = derive_spec(model, x)
    names = {g.name: g for g in spec.groups}
    # one residual stream through patch embedding, class token, position embeddings, norms and the head
    stream = names["P_patch_embed"]
    tensors = {a.tensor for a in stream.axes}
    assert {"cls_token", "pos_embed", "norm.weight", "head.weight", "blocks.1.norm2.bias"} <= tensors
    assert stream.blocks == 1
    for i in range(2):
        qk, vo = names[f"P_blocks.{i}.attn.qk"], names[f"P_blocks.{i}.attn.vo"]
        assert (qk.blocks, qk.block_size, vo.blocks) == (4, 4, 4)
        assert qk.block_perm == vo.block_perm  # one permutation of heads for Q, K, V and out_proj's input
        assert {(a.tensor, a.axis, a.offset) for a in vo.axes} >= {(f"blocks.{i}.attn.out_proj.weight", 1, 0)}
    params = dict(model.named_parameters())
    expected = 1 - params["head.bias"].numel() / sum(p.numel() for p in params.values())  # only the head bias
    assert spec.meta["coverage"] == pytest.approx(expected)
    assert spec.meta["coverage"] >= 0.9
    assert spec.meta["left_fixed"] == []


@pytest.mark.parametrize(
    "name", ["vit", "vit32", "encoder_layer", "encoder_stack", "norm_first", "written", "sdpa", "chunk", "split"]
)
def test_invariance_eval_and_train_float64(name: str) -> None:
    torch.manual_seed(0)
    x: torch.Tensor
    model: nn.Module
    if name == "vit":
        model, x = _tiny_vit(), torch.randn(2, 1, 28, 28)
    elif name == "vit32":
        model = build_model("vit", input_shape=(3, 32, 32), num_classes=10, dim=8, depth=1, heads=2)
        x = torch.randn(2, 3, 32, 32)
    elif name.startswith("encoder") or name == "norm_first":
        model = EncoderModel(stack=name == "encoder_stack", norm_first=name == "norm_first")
        x = _seq_input()
    else:
        qkv = name if name in ("chunk", "split") else ""
        model, x = SeqModel(fused=name == "sdpa", drop_path=0.3, qkv=qkv), _seq_input()
    spec = derive_spec(model, x)
    assert spec.meta["coverage"] >= 0.9
    assert any(g.structured for g in spec.groups)
    for seed in range(2):
        perm = Permutation.random(spec, torch.Generator().manual_seed(seed))
        assert not perm.is_identity()
        rel = _relative_invariance(model, spec, perm, x)
        assert rel["eval"] <= 1e-5 and rel["train"] <= 1e-5, rel


def test_structure_matters_and_apply_refuses_a_flat_permutation() -> None:
    """Permuting the query/key units across heads changes the function, and apply refuses it."""
    model, x = SeqModel(), _seq_input()
    spec = derive_spec(model, x)
    qk = spec.group("P_attn.q")
    assert qk.structured
    assert {a.tensor for a in qk.axes} == {"attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias"}
    perm = Permutation.identity(spec)
    swap = torch.arange(qk.size)
    swap[[0, qk.block_size]] = swap[[qk.block_size, 0]]  # unit 0 of head 0 <-> unit 0 of head 1
    bad = Permutation({**perm.perms, qk.name: swap})
    with pytest.raises(SpecError, match="between its"):
        bad.apply(model.state_dict(), spec)
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    for t in ("attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias"):
        theta[t] = theta[t].index_select(0, swap)
    with torch.no_grad():
        assert (torch.func.functional_call(model, theta, (x,)) - model(x)).abs().max() > 1e-4


def test_spec_dict_roundtrip_and_flat_groups_unchanged() -> None:
    spec = derive_spec(SeqModel(), _seq_input())
    d = spec.to_dict()
    flat = next(g for g in d["groups"] if g["name"] == "P_fc1")
    assert set(flat) == {"name", "size", "activations", "axes"}  # the flat format as before
    assert PermutationSpec.from_dict(d) == spec


def test_random_structured_permutation_respects_blocks() -> None:
    spec = derive_spec(_tiny_vit(), torch.randn(2, 1, 28, 28))
    perm = Permutation.random(spec, torch.Generator().manual_seed(5))
    sigmas = block_structure(spec, perm.perms)
    assert set(sigmas) == {"H_blocks.0.attn.qk", "H_blocks.1.attn.qk"}
    q = perm["P_blocks.0.attn.qk"].reshape(4, 4)
    assert torch.equal(q // 4, sigmas["H_blocks.0.attn.qk"][:, None].expand(4, 4))
    assert block_structure(spec, perm.inverse().compose(perm).perms)  # a group: compose/inverse stay structured


# ------------------------------------------------------------------------------ never silently partial


def test_unknown_op_in_residual_branch_raises_naming_it() -> None:
    model, x = SeqModel(odd_op=True), _seq_input()
    with pytest.raises(SpecError) as err:
        derive_spec(model, x)
    msg = str(err.value)
    assert "torch.cumsum" in msg and "'cumsum'" in msg and "test_transformers.py:" in msg
    assert "leave_unknown_fixed" in msg


def test_unknown_module_in_residual_branch_raises() -> None:
    """The case that used to be silent: an unknown op whose output is added to the stream fixed it."""

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.mix, self.fc1, self.fc2 = nn.Linear(5, 16), Mixer(), nn.Linear(16, 32), nn.Linear(32, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            x = x + self.mix(x)  # an opaque leaf in a residual branch
            x = x + self.fc2(F.relu(self.fc1(x)))
            return self.head(x)

    x = torch.randn(4, 5)
    with pytest.raises(SpecError, match="module Mixer"):
        derive_spec(Net(), x, leaf_modules=(Mixer,))
    spec = derive_spec(Net(), x, leaf_modules=(Mixer,), leave_unknown_fixed=True)
    assert [g.name for g in spec.groups] == ["P_fc1"]  # only the MLP's hidden units stay permuted
    assert any("module Mixer" in s for s in spec.meta["left_fixed"])
    assert "embed (16 units)" in spec.meta["left_fixed_units"]
    assert "embed.weight axis 0" in spec.meta["left_fixed_axes"]
    params = dict(Net().named_parameters())
    permuted = ("fc1.weight", "fc1.bias", "fc2.weight")
    total = sum(p.numel() for p in params.values())
    assert spec.meta["coverage"] == pytest.approx(sum(params[t].numel() for t in permuted) / total)


def test_opt_in_reports_what_stayed_fixed_and_still_verifies() -> None:
    model, x = SeqModel(odd_op=True), _seq_input()
    spec = derive_spec(model, x, leave_unknown_fixed=True)
    assert len(spec.meta["left_fixed"]) == 1 and "torch.cumsum" in spec.meta["left_fixed"][0]
    assert "fc2 (16 units)" in spec.meta["left_fixed_units"]  # the residual stream, tied to fc2's outputs
    assert "head.weight axis 1" in spec.meta["left_fixed_axes"]
    assert "P_embed" not in spec.names and "P_fc1" in spec.names and "P_attn.q" in spec.names
    perm = Permutation.random(spec, torch.Generator().manual_seed(0))
    assert check_invariance(model, spec, perm, x).worst < 1e-12
    full = derive_spec(SeqModel(), x)
    assert spec.meta["coverage"] < full.meta["coverage"]


def test_coverage_counts_parameters_in_permuted_tensors() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = derive_spec(mlp, torch.randn(2, 4))
    assert coverage(spec, dict(mlp.named_parameters())) == pytest.approx((4 * 8 + 8 + 8 * 3) / (4 * 8 + 8 + 8 * 3 + 3))
    assert spec.meta["coverage"] == pytest.approx((4 * 8 + 8 + 8 * 3) / (4 * 8 + 8 + 8 * 3 + 3))


# ------------------------------------------------------------------------------ stochastic layers


def test_drop_path_train_mode_is_exact() -> None:
    """DropPath draws one number per sample; with the RNG fixed per call both passes draw the same."""
    model, x = SeqModel(drop_path=0.5), _seq_input()
    spec = derive_spec(model, x)
    perm = Permutation.random(spec, torch.Generator().manual_seed(1))
    diffs = check_invariance(model, spec, perm, x)
    assert diffs.train is not None and diffs.train < 1e-12
    model.train()
    with torch.no_grad():  # the layer is really random in train mode
        assert (model(x) - model(x)).abs().max() > 0


# ------------------------------------------------------------------------------ weight matching with heads


def _brute_force_structured(costs: list[torch.Tensor], h: int) -> float:
    """max over σ and per-group within-block permutations of Σ_g Σ_i S_g[i, p_g[i]], by enumeration."""
    d = costs[0].shape[0] // h
    best = -math.inf
    for sigma in itertools.permutations(range(h)):
        total = 0.0
        for s in costs:
            for i in range(h):
                block = s[i * d : (i + 1) * d, sigma[i] * d : (sigma[i] + 1) * d]
                total += max(sum(float(block[k, a[k]]) for k in range(d)) for a in itertools.permutations(range(d)))
        best = max(best, total)
    return best


def test_head_block_assignment_is_the_structured_optimum() -> None:
    g = torch.Generator().manual_seed(0)
    h, d = 3, 3
    costs = [torch.randn(h * d, h * d, generator=g, dtype=torch.float64) for _ in range(2)]
    perms, sigma, head = head_block_assignment(costs, h)
    value = sum(float(s[torch.arange(h * d), p].sum()) for s, p in zip(costs, perms))
    assert value == pytest.approx(_brute_force_structured(costs, h), abs=1e-12)
    for p in perms:  # structured, sharing σ
        assert torch.equal(p.reshape(h, d) // d, sigma[:, None].expand(h, d))
    assert float(head[torch.arange(h), sigma].sum()) == pytest.approx(value, abs=1e-12)
    assert torch.equal(structured_perm(sigma, (perms[0].reshape(h, d) % d)), perms[0])


def test_weight_matching_recovers_a_planted_head_permutation() -> None:
    model = _tiny_vit()
    spec = derive_spec(model, torch.randn(2, 1, 28, 28))
    theta = {k: v.double() for k, v in model.state_dict().items()}
    planted = Permutation.random(spec, torch.Generator().manual_seed(3))
    assert not all(torch.equal(s, torch.arange(len(s))) for s in block_structure(spec, planted.perms).values())
    theta_b = planted.apply(theta, spec)
    res = weight_matching(theta, theta_b, spec)
    assert res.perm == planted.inverse()
    norm2 = sum(float((theta[t] ** 2).sum()) for t in spec.axes_by_tensor())
    assert res.objective[-1] == pytest.approx(norm2, rel=1e-12)  # ⟨θ, π(θ_B)⟩ = ‖θ‖²: the maximum
    assert res.distance_after == pytest.approx(0.0, abs=1e-12)


def _permuted_copy(model: nn.Module, spec: PermutationSpec, perm: Permutation) -> nn.Module:
    other = copy.deepcopy(model)
    other.load_state_dict(perm.apply(model.state_dict(), spec))
    return other


def test_activation_matching_recovers_a_planted_head_permutation() -> None:
    model = _tiny_vit()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    spec = derive_spec(model, x[:2])
    planted = Permutation.random(spec, torch.Generator().manual_seed(3))
    heads = block_structure(spec, planted.perms)
    assert not all(torch.equal(s, torch.arange(len(s))) for s in heads.values())
    res = activation_matching(model, _permuted_copy(model, spec, planted), spec, [x[:8], x[8:]])
    assert res.perm == planted.inverse()
    assert res.distance_after == pytest.approx(0.0, abs=1e-5)
    sources = res.info["module_sources"]  # heads, within-head units and MLP units come from module hooks
    assert sources["P_blocks.0.attn.qk"] == ["blocks.0.attn:q", "blocks.0.attn:k"]
    assert sources["P_blocks.0.attn.vo"] == ["blocks.0.attn:v", "blocks.0.attn:o"]
    assert sources["P_blocks.1.mlp.0"] == ["blocks.1.mlp.2:input"]
    # the residual stream: its fx node (the patch embedding) and the input of every LayerNorm
    assert sources["P_patch_embed"] == [f"blocks.{i}.norm{j}:input" for i in range(2) for j in (1, 2)] + ["norm:input"]
    # every matched unit correlates with itself: the objective is the number of units
    assert res.objective[0] == pytest.approx(sum(g.size for g in spec.groups), rel=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_activation_matching_recovers_heads_of_written_attention(fused: bool) -> None:
    """Attention written out (q, k, v Linears; matmuls or SDPA): queries/keys recorded at the Linears'
    outputs, values at out-projection's input; the planted heads and within-head units are recovered."""
    torch.manual_seed(0)
    model, x = SeqModel(fused=fused), torch.randn(64, 7, 5, generator=torch.Generator().manual_seed(0))
    spec = derive_spec(model, x)
    planted = Permutation.random(spec, torch.Generator().manual_seed(6))
    assert not all(torch.equal(s, torch.arange(len(s))) for s in block_structure(spec, planted.perms).values())
    res = activation_matching(model, _permuted_copy(model, spec, planted), spec, [x])
    qk = [g.name for g in spec.groups if g.structured and "q" in {a.tensor.split(".")[1] for a in g.axes}]
    assert res.info["module_sources"][qk[0]] == ["attn.q:output", "attn.k:output"]
    assert res.perm == planted.inverse()


def test_activation_and_head_attention_outputs_match_the_module() -> None:
    """The hook-computed heads' output ("o") is the input of out_proj: out_proj(o) == the module's output."""
    mha = nn.MultiheadAttention(8, 2, batch_first=False)
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(0))
    acts = _attention_activations(mha, (x, x, x), {})
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0].transpose(0, 1)
        assert torch.allclose(mha.out_proj(acts["o"]), ref, atol=1e-6)
        assert torch.allclose(acts["q"], F.linear(x, mha.in_proj_weight[:8], mha.in_proj_bias[:8]).transpose(0, 1))
    with pytest.raises(ValueError, match="masks"):
        _attention_activations(mha, (x, x, x), {"attn_mask": torch.zeros(5, 5)})


# ------------------------------------------------------------------------------ zoo


def test_vit_in_the_zoo() -> None:
    for shape in ((1, 28, 28), (3, 32, 32)):
        model = build_model("vit", input_shape=shape, num_classes=10)
        assert model(torch.zeros(2, *shape)).shape == (2, 10)
    assert build_model("vit", input_shape=(1, 28, 28), num_classes=10).patch_embed.kernel_size == (7, 7)
    assert build_model("vit", input_shape=(3, 32, 32), num_classes=10).patch_embed.kernel_size == (4, 4)
    with pytest.raises(ModelError, match="heads"):
        build_model("vit", input_shape=(1, 28, 28), num_classes=10, heads=5)
    with pytest.raises(ModelError, match="patch"):
        build_model("vit", input_shape=(1, 30, 30), num_classes=10)


class MHAModel(nn.Module):
    """Two token streams (x: 16 features, y: 12) and nn.MultiheadAttention in one of its configurations."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.ex, self.ey = nn.Linear(5, 16), nn.Linear(5, 12 if variant == "cross_kdim" else 16)
        kw = {"kdim": 12, "vdim": 12} if variant == "cross_kdim" else {}
        self.attn = nn.MultiheadAttention(16, 4, add_bias_kv=variant == "bias_kv", dropout=0.2, **kw)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ex(x)
        kv = self.ey(x) if self.variant in ("cross", "cross_kdim") else q
        out, weights = self.attn(q, kv, kv, average_attn_weights=self.variant != "per_head")
        y = self.head(q + out)
        if self.variant == "per_head":
            return y, weights  # the per-head weights are an output: the heads cannot move
        return y


@pytest.mark.parametrize("variant", ["self", "cross", "cross_kdim", "bias_kv", "per_head"])
def test_multihead_attention_variants(variant: str) -> None:
    torch.manual_seed(0)
    model, x = MHAModel(variant), torch.randn(7, 2, 5)  # (L, N, E): batch_first=False
    spec = derive_spec(model, x)
    perm = Permutation.random(spec, torch.Generator().manual_seed(2))
    assert check_invariance(model, spec, perm, x).worst < 1e-12
    structured = [g for g in spec.groups if g.structured]
    if variant == "per_head":
        assert structured == []  # returned per-head weights pin the heads (and so the head-structured sets)
    else:
        assert {g.name for g in structured} == {"P_attn.qk", "P_attn.vo"}
        if variant == "bias_kv":
            assert ("attn.bias_k", 2) in {(a.tensor, a.axis) for a in spec.group("P_attn.qk").axes}
    if variant == "cross":  # one in_proj weight reads both streams: they are tied into one group
        assert "P_ey" not in spec.names
    if variant == "cross_kdim":
        assert "P_ey" in spec.names


def test_align_report_prints_coverage() -> None:
    text = _alignment_report("weight", {"a": "A", "b": "B", "coverage": 0.9731}, Path("p.safetensors"))
    assert "coverage: 97.31% of the parameters lie in permuted groups" in text
    assert "coverage: not recorded" in _alignment_report("weight", {}, Path("p.safetensors"))
    text = _alignment_report("weight", {"a": "A", "b": "B", "sweeps": 2, "info": {"start": "anchored"}}, Path("p"))
    assert text.splitlines()[0] == "weight matching of B onto A: from the anchored start; 2 sweep(s)"


def test_fused_qkv_split_into_query_key_and_value_sets() -> None:
    spec = derive_spec(SeqModel(qkv="chunk"), _seq_input())
    qk, v = spec.group("P_attn.qkv.0"), spec.group("P_attn.qkv.2")
    assert {(a.tensor, a.offset) for a in qk.axes} == {
        ("attn.qkv.weight", 0),
        ("attn.qkv.weight", 16),
        ("attn.qkv.bias", 0),
        ("attn.qkv.bias", 16),
    }
    assert {(a.tensor, a.axis, a.offset) for a in v.axes} == {
        ("attn.qkv.weight", 0, 32),
        ("attn.qkv.bias", 0, 32),
        ("attn.o.weight", 1, 0),
    }
    assert qk.block_perm == v.block_perm and qk.blocks == 4
