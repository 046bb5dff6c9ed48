"""Permutation specs of `transformers` models (GPT-2, BERT) built from tiny random-weight configs, derived
through torch.export (fx cannot trace them) and verified: f(π(θ)) == f(θ) in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmclab.align.weight_matching import weight_matching
from lmclab.permutation import (
    Permutation,
    PermutationSpec,
    SpecError,
    check_invariance,
    derive_spec,
    export,
    verify_permutation,
)
from lmclab.permutation.export import canonical_names, export_graph
from lmclab.permutation.spec import block_structure

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()  # tiny vocabularies: bos/eos id warnings

VOCAB, SEQ = 50, 8


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _padding_mask() -> torch.Tensor:
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 5:] = 0
    return mask


def _gpt2(head: bool = True) -> nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16, use_cache=False,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip  # attn_pdrop: the rate of a Dropout module handed to SDPA, zeroed by verification
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg) if head else transformers.GPT2Model(cfg)
    return model.double()


def _bert(head: bool = True) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip  # BERT hands SDPA a float attribute, not a Dropout module: verification cannot zero it
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg) if head else transformers.BertModel(cfg)
    return model.double()


def _first_output(model: nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = model(*x)
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


def _relative_invariance(model: nn.Module, spec: PermutationSpec, x: tuple[torch.Tensor, ...], seeds: int = 3) -> float:
    """max over random permutations and both modes of max |f(π(θ)) − f(θ)| / max |f(θ)| (float64; in
    train mode verification switches the dropout modules off)."""
    worst, scale = 0.0, float(_first_output(model.eval(), x).abs().max())
    for seed in range(seeds):
        perm = Permutation.random(spec, torch.Generator().manual_seed(seed))
        assert not perm.is_identity()
        worst = max(worst, check_invariance(model, spec, perm, x).worst)
    assert math.isfinite(scale) and math.isfinite(worst)
    return worst / scale


# ------------------------------------------------------------------------------ GPT-2


def test_gpt2_spec_through_export_heads_stream_and_tied_embedding() -> None:
    model, x = _gpt2(), (_ids(),)
    with pytest.raises(SpecError, match="torch.fx cannot trace GPT2LMHeadModel"):
        derive_spec(model, x, tracer="fx")
    spec = derive_spec(model, x)  # auto: fx fails, export captures it
    assert spec.meta["tracer"] == "export"
    assert spec.meta["coverage"] >= 0.9
    assert spec.meta["coverage"] == pytest.approx(1.0)  # the vocabulary axes are permuted nowhere, but
    # every parameter tensor has a permuted axis (the lm_head is the tied wte)
    stream = spec.group("P_transformer.wte")
    axes = {(a.tensor, a.axis) for a in stream.axes}
    assert {("transformer.wte.weight", 1), ("lm_head.weight", 1), ("transformer.wpe.weight", 1)} <= axes
    assert ("transformer.h.1.attn.c_proj.weight", 1) in axes  # Conv1D: weight stored in × out
    heads = [g for g in spec.groups if g.blocks > 1]
    assert [(g.size, g.blocks) for g in heads] == [(32, 4)] * 4  # per layer: q/k and v/o, one σ of heads
    for layer in range(2):
        qk, vo = (spec.group(f"P_transformer.h.{layer}.attn.c_attn.{i}") for i in (0, 2))
        assert qk.block_perm == vo.block_perm
        offsets = sorted(a.offset for a in qk.axes if a.tensor.endswith("c_attn.weight"))
        assert offsets == [0, 32]  # query and key columns of the fused c_attn share the permutation
        assert {(a.tensor.split(".")[-2], a.axis, a.offset) for a in vo.axes} >= {("c_attn", 1, 64), ("c_proj", 0, 0)}
    mlp = spec.group("P_transformer.h.0.mlp.c_fc")
    assert mlp.size == 128 and mlp.blocks == 1


def test_gpt2_verifies_and_stays_tied() -> None:
    model, x = _gpt2(), (_ids(),)
    spec = derive_spec(model, x)
    assert _relative_invariance(model, spec, x) <= 1e-10
    padded = (_ids(), None, _padding_mask().flip(1))  # input_ids, past_key_values, attention_mask (left-padded)
    assert not torch.allclose(_first_output(model.eval(), padded), _first_output(model, x))  # the mask is used
    assert _relative_invariance(model, derive_spec(model, padded), padded) <= 1e-10
    perm = Permutation.random(spec, torch.Generator().manual_seed(0))
    verify_permutation(model, perm, spec, example_input=x, atol=0.0, rtol=1e-10)
    theta = model.state_dict()
    permuted = perm.apply(theta, spec)
    assert torch.equal(permuted["lm_head.weight"], permuted["transformer.wte.weight"])
    assert not torch.equal(permuted["lm_head.weight"], theta["lm_head.weight"])
    untied = dict(permuted, **{"lm_head.weight": theta["lm_head.weight"]})
    with pytest.raises(SpecError, match="unties the tied tensors"):
        verify_permutation(model, untied, None, example_input=x)


def test_gpt2_model_keeps_its_output_stream_fixed() -> None:
    """GPT2Model returns the residual stream itself: it is the output, never permuted; heads and MLP are."""
    model, x = _gpt2(head=False), (_ids(),)
    spec = derive_spec(model, x)
    permuted = {a.tensor for g in spec.groups for a in g.axes}
    assert "wte.weight" not in permuted and "ln_f.weight" not in permuted
    assert {"h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight"} <= permuted
    params = dict(model.named_parameters())
    in_groups = sum(p.numel() for n, p in params.items() if n in permuted)
    assert spec.meta["coverage"] == pytest.approx(in_groups / sum(p.numel() for p in params.values()), abs=1e-15)
    assert spec.meta["coverage"] < 0.95  # embeddings, norms and the output projections' biases stay put
    assert _relative_invariance(model, spec, x) <= 1e-10


def test_gpt2_weight_matching_recovers_a_planted_permutation() -> None:
    model = _gpt2()
    spec = derive_spec(model, (_ids(),))
    theta = model.state_dict()
    planted = Permutation.random(spec, torch.Generator().manual_seed(3))
    assert not all(torch.equal(s, torch.arange(len(s))) for s in block_structure(spec, planted.perms).values())
    res = weight_matching(theta, planted.apply(theta, spec), spec)
    assert res.perm == planted.inverse()
    assert res.distance_after == pytest.approx(0.0, abs=1e-10)


# ------------------------------------------------------------------------------ BERT


def test_bert_spec_with_padding_mask_verifies() -> None:
    model, x = _bert(), (_ids(), _padding_mask())
    unmasked = _first_output(model.eval(), (_ids(),))
    assert not torch.allclose(unmasked, _first_output(model, x))  # the mask is used
    spec = derive_spec(model, x)
    assert spec.meta["tracer"] == "export"
    assert spec.meta["coverage"] >= 0.9
    uncovered = {n for n, _ in model.named_parameters()} - {a.tensor for g in spec.groups for a in g.axes}
    assert uncovered == {"classifier.bias"}  # the logits' own axis
    stream = {(a.tensor, a.axis) for a in spec.group("P_bert.embeddings.word_embeddings").axes}
    for t in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert (f"bert.embeddings.{t}.weight", 1) in stream
    assert ("bert.pooler.dense.weight", 1) in stream
    pooler = {(a.tensor, a.axis) for a in spec.group("P_bert.pooler.dense").axes}
    assert pooler == {("bert.pooler.dense.weight", 0), ("bert.pooler.dense.bias", 0), ("classifier.weight", 1)}
    for layer in range(2):
        p = f"P_bert.encoder.layer.{layer}.attention.self."
        qk, vo = spec.group(p + "query"), spec.group(p + "value")
        assert (qk.blocks, vo.blocks) == (4, 4) and qk.block_perm == vo.block_perm
        assert {a.tensor.split(".")[-2] for a in qk.axes} == {"query", "key"}
    assert _relative_invariance(model, spec, x) <= 1e-10


def test_bert_model_outputs_fix_the_stream() -> None:
    model, x = _bert(head=False), (_ids(), _padding_mask())
    spec = derive_spec(model, x)
    permuted = {a.tensor for g in spec.groups for a in g.axes}
    assert not any(t.startswith(("embeddings.", "pooler.")) for t in permuted)  # both outputs stay put
    assert "encoder.layer.1.intermediate.dense.weight" in permuted
    assert spec.meta["coverage"] < 0.95  # the stream is an output (last_hidden_state)
    assert _relative_invariance(model, spec, x) <= 1e-10


# ------------------------------------------------------------------------------ the export path


class _Odd(nn.Module):
    """An MLP with a cumulative sum over its hidden units inside a residual branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cumsum(self.fc1(x), dim=-1)
        return self.head(x + self.fc2(h))


def test_export_refuses_an_unknown_op_naming_it_and_its_source_line() -> None:
    with pytest.raises(SpecError, match=r"cumsum.*test_hf_transformers\.py:\d+"):
        derive_spec(_Odd(), torch.randn(3, 4), tracer="export")
    spec = derive_spec(_Odd(), torch.randn(3, 4), tracer="export", leave_unknown_fixed=True)
    assert spec.meta["left_fixed_units"] == ["fc1 (8 units)"]


def test_export_and_fx_agree_on_a_traceable_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    by_fx, by_export = derive_spec(model, x, tracer="fx"), derive_spec(model, x, tracer="export")
    assert (by_fx.meta["tracer"], by_export.meta["tracer"]) == ("fx", "export")
    assert [(g.size, set(g.axes)) for g in by_fx.groups] == [(g.size, set(g.axes)) for g in by_export.groups]
    assert all(not g.activations for g in by_export.groups)


def test_export_graph_reproduces_the_model_and_names_its_parameters() -> None:
    model, x = _gpt2(), (_ids(),)
    gm = export_graph(model, x)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    assert "transformer.wte.weight" in targets and "lm_head.weight" not in targets  # tied: its first name
    assert canonical_names(model)["lm_head.weight"] == "transformer.wte.weight"
    assert torch.equal(gm(*x)[0], _first_output(model.eval(), x))


def test_tracer_errors() -> None:
    with pytest.raises(ValueError, match="unknown tracer"):
        derive_spec(_Odd(), torch.randn(3, 4), tracer="jit")
    with pytest.raises(SpecError, match="needs an example_input"):
        derive_spec(_Odd(), tracer="export")
    cached = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB))
    with pytest.raises(SpecError, match="use_cache=False"):
        derive_spec(cached, (_ids(),))


# ------------------------------------------------------------------------------ nn.TransformerEncoder


class _Encoder(nn.Module):
    """Linear embedding → nn.TransformerEncoder (2 layers, masks optional) → head on token 0."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.embed = nn.Linear(5, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)
        self.double()

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.embed(x) if self.batch_first else self.embed(x).transpose(0, 1)
        h = self.encoder(h, mask=mask, src_key_padding_mask=padding)
        return self.head(h[:, 0] if self.batch_first else h[0])


def _seq() -> torch.Tensor:
    return torch.randn(2, SEQ, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class _PlainEncoder(_Encoder):
    """Without mask arguments (fx makes every argument of forward a graph input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)


def test_transformer_encoder_export_agrees_with_fx() -> None:
    model, x = _PlainEncoder(), _seq()
    by_fx, by_export = derive_spec(model, x, tracer="fx"), derive_spec(model, x, tracer="export")

    def content(spec: PermutationSpec) -> set[tuple[int, int, frozenset]]:
        return {(g.size, g.blocks, frozenset(g.axes)) for g in spec.groups}

    assert content(by_fx) == content(by_export)
    assert by_export.meta["coverage"] == by_fx.meta["coverage"] >= 0.9


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_with_causal_and_padding_masks(batch_first: bool) -> None:
    model = _Encoder(batch_first)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)  # True: not attended
    padding = torch.zeros(2, SEQ, dtype=torch.bool)
    padding[1, 5:] = True
    x = (_seq(), causal, padding)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(*x), model(_seq()))  # the masks are used
    with pytest.raises(SpecError, match="without masks"):
        derive_spec(model, x, tracer="fx")
    spec = derive_spec(model, x)
    assert spec.meta["tracer"] == "export" and spec.meta["coverage"] >= 0.9
    assert sum(g.blocks == 4 for g in spec.groups) == 4
    assert _relative_invariance(model, spec, x) <= 1e-10
    assert _relative_invariance(model, spec, (_seq(), None, padding)) <= 1e-10


def test_a_mask_that_differs_between_heads_is_refused() -> None:
    """A per-head attention mask (N·h, L, S) is not invariant under permuting the heads."""
    model = _Encoder()
    per_head = torch.zeros(2 * 4, SEQ, SEQ, dtype=torch.float64)
    per_head[0, :, 3] = float("-inf")
    with pytest.raises(SpecError, match="attention mask that differs between heads"):
        derive_spec(model, (_seq(), per_head))


def test_a_translation_that_changes_the_function_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(export._TABLE, "gelu", export._fn(torch.tanh, "self"))  # a wrong translation
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    with pytest.raises(SpecError, match="changes its outputs"):
        derive_spec(model, torch.randn(5, 4), tracer="export")
