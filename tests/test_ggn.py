"""The GGN part of the Hessian (lmclab.curvature.ggn) against dense matrices on tiny float64 nets.

Independent reference: J_n from torch.func.jacrev of the logits over the flat parameter vector, S_n from
torch.func.hessian of the per-sample loss over the logits, G = (1/N) Σ J_nᵀ S_n J_n; H from `dense_hessian`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmclab.curvature.functional import functional_model, summed_cross_entropy
from lmclab.curvature.ggn import _linear_owners, _linear_route_ok, ggn_products, ggn_trace, loss_curvature_factors
from lmclab.curvature.hessian import HessianOperator, dense_hessian
from lmclab.curvature.trace import hessian_trace, lanczos_top, random_probe, top_eigenvalue
from lmclab.points import flatten, parameter_names, unflatten


class ReluNet(nn.Module):
    """Piecewise linear: diag R = 0, so tr H = tr G."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class NormNet(nn.Module):
    """LayerNorm + GELU, a Linear on 3-D input (tokens) and a parameter outside any Linear (diag R ≠ 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.tensor([1.3, 0.7, 1.1, 0.9]))
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3 tokens, 2)
        h = F.gelu(self.norm(self.embed(x))) * self.scale
        return self.head(h.mean(1))


class TiedNet(nn.Module):
    """fc1's weight is also used outside fc1: the Linear route's check must send it per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        return self.fc2(h @ self.fc1.weight)


class InplaceNet(nn.Module):
    """An in-place ReLU overwrites fc1's recorded output: the Linear route's check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _setup(kind: str, seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = {"relu": ReluNet, "norm": NormNet, "tied": TiedNet, "inplace": InplaceNet}[kind]().double()
    shape = {"relu": (5,), "norm": (3, 2), "tied": (4,), "inplace": (5,)}[kind]
    x = torch.randn(11, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    return model, [(x[:7], y[:7]), (x[7:], y[7:])]  # uneven batches


def _dense_ggn(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], loss_fn=summed_cross_entropy):
    fm = functional_model(model)
    like = {k: fm.params[k].double() for k in parameter_names(model)}  # dense_hessian's order
    flat = flatten(like)
    g = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    n = 0
    for x, y in data:
        jac = torch.func.jacrev(lambda p, x=x: fm.logits(unflatten(p, like), x))(flat)  # (N, C, P)
        f = fm.logits(like, x).detach()
        s = torch.stack(
            [torch.func.hessian(lambda z, yi=yi: loss_fn(z[None], yi[None]))(fi) for fi, yi in zip(f, y)]
        )  # (N, C, C)
        g += torch.einsum("ncp,ncd,ndq->pq", jac, s, jac)
        n += len(y)
    return g / n, like


def _sq_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A non-CE loss with a non-identity logit Hessian: Σ_n Σ_c w_c (z_c − 1[c = y])² + z_0 z_1."""
    onehot = (targets[:, None] == torch.arange(logits.shape[1])).to(logits.dtype)
    w = torch.arange(1, logits.shape[1] + 1, dtype=logits.dtype)
    return ((logits - onehot) ** 2 * w).sum() + (logits[:, 0] * logits[:, 1]).sum()


@pytest.mark.parametrize("kind", ["relu", "norm", "tied", "inplace"])
def test_exact_ggn_trace_equals_dense(kind: str) -> None:
    model, data = _setup(kind)
    g, _ = _dense_ggn(model, data)
    for route in ("auto", "per_sample"):
        got = ggn_trace(model, None, data, route=route, batch_size=100)
        assert got == pytest.approx(float(torch.trace(g)), rel=1e-10), route


@pytest.mark.parametrize("kind", ["tied", "inplace"])
def test_linear_route_check_catches(kind: str) -> None:
    model, data = _setup(kind)
    fm = functional_model(model)
    assert not _linear_route_ok(fm, _linear_owners(fm), data[0][0])


def test_linear_route_check_passes() -> None:
    model, data = _setup("norm")
    fm = functional_model(model)
    assert _linear_route_ok(fm, _linear_owners(fm), data[0][0])


def test_ggn_trace_other_loss() -> None:
    model, data = _setup("norm")
    g, _ = _dense_ggn(model, data, _sq_loss)
    got = ggn_trace(model, None, data, loss_fn=_sq_loss, batch_size=100)
    assert got == pytest.approx(float(torch.trace(g)), rel=1e-10)


def test_cross_entropy_factor() -> None:
    """U Uᵀ = diag(p) − p pᵀ, the CE logit Hessian."""
    f = torch.randn(4, 5, dtype=torch.float64)
    lam, u = loss_curvature_factors(f, torch.zeros(4, dtype=torch.long), summed_cross_entropy)
    p = torch.softmax(f, 1)
    assert torch.equal(lam, torch.ones_like(p))
    assert torch.allclose(u @ u.transpose(1, 2), torch.diag_embed(p) - p[:, :, None] * p[:, None, :], atol=1e-14)


@pytest.mark.parametrize("kind", ["relu", "norm"])
def test_ggn_products_equal_dense(kind: str) -> None:
    model, data = _setup(kind)
    g, like = _dense_ggn(model, data)
    gen = torch.Generator().manual_seed(3)
    vs = [random_probe(like, gen, "gaussian") for _ in range(2)]
    for v, gv in zip(vs, ggn_products(model, None, vs, data)):
        assert torch.allclose(flatten(gv), g @ flatten(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["relu", "norm"])
@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_residual_products_equal_dense(kind: str, method: str) -> None:
    model, data = _setup(kind)
    g, like = _dense_ggn(model, data)
    h = dense_hessian(model, None, data, batch_size=100)
    op = HessianOperator(model, None, data, batch_size=100, method=method, part="residual")
    v = random_probe(like, torch.Generator().manual_seed(4), "gaussian")
    assert torch.allclose(flatten(op.matvec(v)), (h - g) @ flatten(v), rtol=1e-9, atol=1e-11)


def test_relu_net_trace_is_ggn_trace() -> None:
    """Piecewise linear: diag R = 0 (f linear in each single weight), so tr H = tr G exactly; R itself ≠ 0."""
    model, data = _setup("relu")
    g, _ = _dense_ggn(model, data)
    h = dense_hessian(model, None, data, batch_size=100)
    assert torch.allclose(torch.diagonal(h - g), torch.zeros(len(h), dtype=torch.float64), atol=1e-12)
    assert float((h - g).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["relu", "norm"])
def test_control_variate_estimator(kind: str) -> None:
    """CI covers the dense tr H; mean within 3 standard errors; with 0 probes' noise the estimator is tr G + mean."""
    model, data = _setup(kind)
    exact = float(torch.trace(dense_hessian(model, None, data, batch_size=100)))
    est = hessian_trace(model, None, data, control_variate="ggn", probes=200, batch_size=100, seed=1)
    assert est.method == "hutchinson-ggn" and est.n_probes == 200
    assert est.ci_low <= exact <= est.ci_high
    se = torch.tensor(est.samples, dtype=torch.float64).std().item() / math.sqrt(len(est.samples))
    assert abs(est.estimate - exact) <= 3 * se + 1e-12
    tr_g = ggn_trace(model, None, data, batch_size=100)
    assert est.estimate == pytest.approx(tr_g + float(torch.tensor(est.samples, dtype=torch.float64).mean()), rel=1e-12)
    if kind == "norm":  # diag R ≠ 0 here: the residual carries part of the trace
        assert abs(exact - tr_g) > 10 * se


def test_control_variate_adaptive_and_refusals() -> None:
    model, data = _setup("relu")
    exact = float(torch.trace(dense_hessian(model, None, data, batch_size=100)))
    est = hessian_trace(
        model, None, data, control_variate="ggn", probes=5, target_ci_width=0.1, batch_size=100, probes_per_pass=4
    )
    assert est.relative_half_width <= 0.1 and est.ci_low <= exact <= est.ci_high
    # each sample is zᵀ(H − G)z for the seeded probes, in order
    g, like = _dense_ggn(model, data)
    r = dense_hessian(model, None, data, batch_size=100) - g
    gen = torch.Generator().manual_seed(0)
    zs = [flatten(random_probe(like, gen, "rademacher")) for _ in range(est.n_probes)]
    assert torch.allclose(torch.tensor(est.samples, dtype=torch.float64), torch.stack([z @ r @ z for z in zs]))
    with pytest.raises(ValueError, match="control_variate"):
        hessian_trace(model, None, data, control_variate="kfac")
    with pytest.raises(ValueError, match="hutchinson"):
        hessian_trace(model, None, data, control_variate="ggn", method="hutchpp")
    with pytest.raises(ValueError, match="scale_aware"):
        hessian_trace(model, None, data, control_variate="ggn", scale_aware=True)
    with pytest.raises(ValueError, match="part"):
        HessianOperator(model, None, data, part="ggn")


# ------------------------------------------------------------- top eigenvalue: gradient start, error test


def test_operator_gradient_equals_autograd() -> None:
    model, data = _setup("norm")
    fm = functional_model(model)
    like = {k: fm.params[k].double() for k in parameter_names(model)}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(summed_cross_entropy(fm.logits(p, x), y) for x, y in data) / 11  # type: ignore[return-value]

    want = flatten(torch.func.grad(loss)(like))
    for batch_size in (100, 4):  # one kept graph; several batches
        op = HessianOperator(model, None, data, batch_size=batch_size)
        assert torch.allclose(flatten(op.gradient()), want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="double_backward"):
        HessianOperator(model, None, data, method="forward_over_reverse").gradient()


def test_lanczos_error_tol_on_a_known_spectrum() -> None:
    """diag(10, 9, 1, …): the estimated error r²/(gap·θ) stops early, and the answer is within the tolerance."""
    d = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(0, 1, 200)]).double()
    v0 = torch.ones(len(d), dtype=torch.float64)
    loose, k_loose = lanczos_top(lambda v: d * v, v0, 1e-12, 200, error_tol=1e-3)
    tight, k_tight = lanczos_top(lambda v: d * v, v0, 1e-10, 200)
    assert abs(loose - 10) / 10 <= 1e-3 and abs(tight - 10) <= 1e-8
    assert k_loose < k_tight


@pytest.mark.parametrize("start", ["random", "gradient"])
def test_top_eigenvalue_starts(start: str) -> None:
    model, data = _setup("norm")
    want = float(torch.linalg.eigvalsh(dense_hessian(model, None, data, batch_size=100))[-1])
    got = top_eigenvalue(model, None, data, batch_size=100, start=start, tol=1e-9)
    assert got == pytest.approx(want, rel=1e-8)
    rough = top_eigenvalue(model, None, data, batch_size=100, start=start, error_tol=1e-4)
    assert rough == pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError, match="start"):
        top_eigenvalue(model, None, data, start="ggn")
