"""Directional derivatives of loss and logits (nested jvp and HVP) and the Taylor approximations built on them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lmclab.curvature.derivatives import (
    AUTO_ORDER2,
    directional_taylor,
    ieee_fp32,
    logit_derivatives,
    loss_derivatives,
    resolve_method,
)
from lmclab.curvature.taylor import (
    centred_at,
    interpolated_logits,
    interpolated_outputs,
    logit_errors,
    logit_rmse,
    logits_at,
    path_approximations,
    path_coefficients,
    path_direction,
    taylor_polynomial,
    taylor_rows,
)
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.models import build_model
from lmclab.points import direction, parameter_names

F64 = torch.float64
C = 3


# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine under load the OpenMP
# barriers made the ResNet tests ~40x slower with 2 threads (67 s vs 8.5 s for this file).
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def toy_dataset(n: int = 53, shape: tuple[int, int, int] = (1, 3, 4), seed: int = 0) -> DeviceDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, C, (n,), generator=g)
    info = DatasetInfo("toy", C, shape, (0.5,) * shape[0], (0.25,) * shape[0], False, tuple("abc"), "test")
    return DeviceDataset(images, labels, info)


def batches(n: int = 12, features: int = 12, seed: int = 0, size: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float64 inputs (n, features) and labels, split into batches of `size` (the last one smaller)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=F64)
    y = torch.randint(0, C, (n,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def deep_linear(depth: int = 3, features: int = 12, hidden: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    sizes = [features] + [hidden] * (depth - 1) + [C]
    return nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:])]).double()


def smooth_mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 8), act(), nn.Linear(8, 8), nn.GELU() if act is nn.Tanh else act(), nn.Linear(8, C)
    ).double()


def random_direction(model: nn.Module, scale: float = 0.3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


def squared_error(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((z - F.one_hot(y, z.shape[-1]).to(z.dtype)) ** 2).sum()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def moved(theta: dict[str, torch.Tensor], d: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    return {k: v + t * d[k] if k in d else v for k, v in theta.items()}


@torch.no_grad()
def mean_loss(model: nn.Module, theta: dict[str, torch.Tensor], data, loss_fn=F.cross_entropy) -> float:
    """(1/N) Σ_n ℓ(z(θ; x_n), y_n) in float64, written independently of lmclab (eval mode)."""
    model = model.eval()
    total, n = 0.0, 0
    for x, y in data:
        z = functional_call(model, theta, (x.to(F64),))
        total += float(loss_fn(z, y, reduction="sum") if loss_fn is F.cross_entropy else loss_fn(z, y))
        n += len(y)
    return total / n


@torch.no_grad()
def all_logits(model: nn.Module, theta: dict[str, torch.Tensor], data) -> torch.Tensor:
    return torch.cat([functional_call(model.eval(), theta, (x.to(F64),)) for x, _ in data])


# ------------------------------------------------------------------------------ exact polynomials


@pytest.mark.parametrize("method", ["jvp", "hvp"])
def test_deep_linear_low_orders_agree(method: str) -> None:
    model, data = deep_linear(), batches()
    theta, d = state(model), random_direction(model)
    r = loss_derivatives(model, theta, d, data, order=2, method=method, loss_fn=squared_error, dtype=F64)
    assert r.method == method and r.n_examples == 12 and r.coefficients.dtype == F64
    assert r.coefficients[0].item() == pytest.approx(mean_loss(model, theta, data, squared_error), rel=1e-12)


def test_deep_linear_loss_is_an_exact_polynomial() -> None:
    """L(θ + t d) with 3 bias-free linear layers and squared error is a polynomial of degree 6 in t."""
    depth = 3
    model, data = deep_linear(depth), batches()
    theta, d = state(model), random_direction(model)
    r = loss_derivatives(model, theta, d, data, order=2 * depth + 1, loss_fn=squared_error, dtype=F64)
    assert r.method == "jvp" and r.coefficients.shape == (2 * depth + 2,)
    scale = r.coefficients.abs().max().item()
    assert abs(r.coefficients[2 * depth].item()) > 1e-3 * scale  # the degree is really 2·depth
    assert abs(r.coefficients[-1].item()) < 1e-10 * scale  # nothing beyond it
    ts = [0.3, 1.0, -0.7, 2.0]
    approx = taylor_polynomial(r.coefficients, ts, 2 * depth)
    truth = torch.tensor([mean_loss(model, moved(theta, d, t), data, squared_error) for t in ts], dtype=F64)
    torch.testing.assert_close(approx, truth, rtol=1e-10, atol=0.0)
    # a lower order does not reproduce it (the test has teeth)
    assert not torch.allclose(taylor_polynomial(r.coefficients, ts, 2), truth, rtol=1e-3)


def test_deep_linear_logits_are_exact_polynomials() -> None:
    depth = 3
    model, data = deep_linear(depth), batches()
    theta, d = state(model), random_direction(model)
    coeffs = logit_derivatives(model, theta, d, data, order=depth + 1, batch_size=5, dtype=F64)
    assert coeffs.shape == (12, C, depth + 2) and coeffs.dtype == F64
    assert coeffs[..., -1].abs().max() < 1e-12 * coeffs.abs().max()
    assert coeffs[..., depth].abs().max() > 1e-3 * coeffs.abs().max()
    ts = [1.0, -0.7, 0.4]
    approx = taylor_polynomial(coeffs, ts, depth)  # (N, C, L)
    truth = torch.stack([all_logits(model, moved(theta, d, t), data) for t in ts], dim=-1)
    torch.testing.assert_close(approx, truth, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ finite differences


def central_differences(f, h: float) -> list[float]:
    """f'(0) … f''''(0): central differences with steps h and h/2, Richardson-extrapolated (error O(h⁴))."""

    def raw(s: float) -> list[float]:
        g = {k: f(k * s) for k in (-2, -1, 0, 1, 2)}
        return [
            (g[1] - g[-1]) / (2 * s),
            (g[1] - 2 * g[0] + g[-1]) / s**2,
            (g[2] - 2 * g[1] + 2 * g[-1] - g[-2]) / (2 * s**3),
            (g[2] - 4 * g[1] + 6 * g[0] - 4 * g[-1] + g[-2]) / s**4,
        ]

    coarse, fine = raw(h), raw(h / 2)
    return [(4 * b - a) / 3 for a, b in zip(coarse, fine)]


def test_smooth_mlp_orders_1_to_4_match_finite_differences() -> None:
    model, data = smooth_mlp(), batches()
    theta, d = state(model), random_direction(model)
    r = loss_derivatives(model, theta, d, data, order=4, dtype=F64)
    fd = central_differences(lambda t: mean_loss(model, moved(theta, d, t), data), 1e-2)
    got = r.coefficients[1:].tolist()
    scale = max(abs(c) for c in got)
    for k, (a, b) in enumerate(zip(got, fd), start=1):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4 * scale), f"order {k}: {a} vs finite differences {b}"


def test_relu_mlp_orders_1_2_match_finite_differences_away_from_kinks() -> None:
    model, data = smooth_mlp(act=nn.ReLU), batches()
    theta, d = state(model), random_direction(model, scale=0.05)
    h = 1e-4

    def pattern(t: float) -> torch.Tensor:
        """Signs of both ReLU layers' pre-activations on all inputs at θ + t d."""
        p = moved(theta, d, t)
        signs = []
        for x, _ in data:
            a1 = F.linear(x, p["0.weight"], p["0.bias"])
            a2 = F.linear(a1.relu(), p["2.weight"], p["2.bias"])
            signs += [(a1 > 0).flatten(), (a2 > 0).flatten()]
        return torch.cat(signs)

    assert torch.equal(pattern(-2 * h), pattern(2 * h)), "a ReLU kink lies within the steps; pick another seed"
    fd = central_differences(lambda t: mean_loss(model, moved(theta, d, t), data), h)[:2]
    for method in ("jvp", "hvp"):
        r = loss_derivatives(model, theta, d, data, order=2, method=method, dtype=F64)
        assert r.coefficients[1].item() == pytest.approx(fd[0], rel=1e-6)
        assert r.coefficients[2].item() == pytest.approx(fd[1], rel=1e-4)


# ------------------------------------------------------------------------------ dense Hessian, methods


def test_second_order_equals_dense_hessian_quadratic_form() -> None:
    model = nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, C)).double()
    data = batches()
    theta, d = state(model), random_direction(model)
    names = [n for n, _ in model.named_parameters()]
    shapes = [theta[n].shape for n in names]
    sizes = [theta[n].numel() for n in names]
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])

    def loss(vec: torch.Tensor) -> torch.Tensor:
        params = {n: p.view(s) for n, p, s in zip(names, vec.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    vec = torch.cat([theta[n].flatten() for n in names])
    dvec = torch.cat([d[n].flatten() for n in names])
    hess = torch.func.hessian(loss)(vec)
    assert hess.shape == (vec.numel(), vec.numel())
    want = float(dvec @ hess @ dvec)
    grad_d = float(torch.func.grad(loss)(vec) @ dvec)
    results = {m: loss_derivatives(model, theta, d, data, order=2, method=m, dtype=F64) for m in ("jvp", "hvp", "auto")}
    for m, r in results.items():
        assert r.coefficients[2].item() == pytest.approx(want, rel=1e-10), m
        assert r.coefficients[1].item() == pytest.approx(grad_d, rel=1e-10), m
        assert r.coefficients[0].item() == pytest.approx(float(loss(vec)), rel=1e-12), m
    torch.testing.assert_close(results["jvp"].coefficients, results["hvp"].coefficients, rtol=1e-10, atol=1e-14)
    assert results["auto"].method == AUTO_ORDER2


def test_methods_validated() -> None:
    assert resolve_method("auto", 2) == AUTO_ORDER2 and resolve_method("auto", 3) == "jvp"
    assert AUTO_ORDER2 in ("jvp", "hvp")
    model, data = smooth_mlp(), batches()
    theta, d = state(model), random_direction(model)
    with pytest.raises(ValueError, match="orders ≤ 2"):
        loss_derivatives(model, theta, d, data, order=3, method="hvp")
    with pytest.raises(ValueError, match="unknown method"):
        loss_derivatives(model, theta, d, data, method="fd")
    with pytest.raises(ValueError, match="order"):
        loss_derivatives(model, theta, d, data, order=-1)
    with pytest.raises(KeyError, match="lacks"):
        loss_derivatives(model, theta, {k: v for k, v in list(d.items())[1:]}, data)
    with pytest.raises(ValueError, match="no examples"):
        loss_derivatives(model, theta, d, [])


def test_nested_jvp_of_normalisations_is_exact() -> None:
    """torch's fused layer/instance/train-mode batch norm give wrong nested-jvp second derivatives; ours don't."""
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(2, 4, 3, 3, generator=g, dtype=F64) for _ in range(2))
    w, u = (torch.randn(4, generator=g, dtype=F64) for _ in range(2))
    weights = torch.linspace(-1, 1, x.numel(), dtype=F64).view_as(x)
    norms = {
        "layer_norm": lambda a, t: F.layer_norm(a.permute(0, 2, 3, 1), (4,), w + t * u, w).permute(0, 3, 1, 2),
        "layer_norm_3d": lambda a, t: F.layer_norm(a, (4, 3, 3)),
        "instance_norm": lambda a, t: F.instance_norm(a, weight=w + t * u, bias=u),
        "batch_norm_train": lambda a, t: F.batch_norm(a, None, None, w + t * u, w, training=True),
        "group_norm": lambda a, t: F.group_norm(a, 2, w + t * u, w),
    }
    for name, op in norms.items():

        def f(t: torch.Tensor, op=op) -> torch.Tensor:
            return (op(x + t * v, t) * weights).sum()

        t = torch.zeros((), dtype=F64, requires_grad=True)
        (g1,) = torch.autograd.grad(f(t), t, create_graph=True)
        (g2,) = torch.autograd.grad(g1, t)
        got = directional_taylor(f, 2, torch.zeros((), dtype=F64))
        assert got[1].item() == pytest.approx(g1.item(), rel=1e-10), name
        assert got[2].item() == pytest.approx(g2.item(), rel=1e-10), name


def test_ieee_fp32_sets_and_restores_the_cuda_precision_flags() -> None:
    """No GPU needed: the flags exist on CPU builds too; on CPU devices nothing changes."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        pytest.skip("torch < 2.9: legacy allow_tf32 flags only")

    def flags() -> tuple[str, str]:
        return cudnn.conv.fp32_precision, matmul.fp32_precision

    before = flags()
    with ieee_fp32("cuda"):
        assert flags() == ("ieee", "ieee")
    assert flags() == before
    with ieee_fp32("cuda", allow_tf32=True), ieee_fp32("cpu"):
        assert flags() == before


def test_layernorm_resnet_jvp_equals_hvp() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 6, 6), num_classes=C, norm="layernorm")
    torch.manual_seed(1)
    other = build_model("resnet20", input_shape=(3, 6, 6), num_classes=C, norm="layernorm")
    data = toy_dataset(8, (3, 6, 6))
    d = {k: 0.2 * v for k, v in direction(model.state_dict(), other.state_dict(), parameter_names(model)).items()}
    jv, hv = (
        loss_derivatives(model, model.state_dict(), d, data, order=2, method=m, dtype=F64).coefficients
        for m in ("jvp", "hvp")
    )
    torch.testing.assert_close(jv, hv, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------ logits


def per_input_class_reference(model: nn.Module, theta, d, x: torch.Tensor) -> torch.Tensor:
    """(N, C, 3) by a loop over inputs and classes: z_c, ∇z_c·d, dᵀ(∇²z_c d) by double backward."""
    names = [n for n, _ in model.named_parameters()]
    leaves = [theta[n].detach().clone().requires_grad_(True) for n in names]
    out = torch.zeros(len(x), C, 3, dtype=F64)
    for n in range(len(x)):
        z = functional_call(model, dict(zip(names, leaves)), (x[n : n + 1],))[0]
        for c in range(C):
            grads = torch.autograd.grad(z[c], leaves, create_graph=True, retain_graph=True)
            gd = sum((g * d[k]).sum() for g, k in zip(grads, names))
            hd = torch.autograd.grad(gd, leaves, retain_graph=True, allow_unused=True)
            hdd = sum((h * d[k]).sum() for h, k in zip(hd, names) if h is not None)
            out[n, c] = torch.stack([z[c].detach(), gd.detach(), hdd.detach()])
    return out


def test_logit_coefficients_per_input_and_against_a_loop() -> None:
    model, data = smooth_mlp(), batches(n=7, size=4)
    theta, d = state(model), random_direction(model)
    coeffs = logit_derivatives(model, theta, d, data, order=2, dtype=F64)
    assert coeffs.shape == (7, C, 3)
    x = torch.cat([b[0] for b in data])
    for n in (0, 4, 6):
        alone = logit_derivatives(
            model, theta, d, [(x[n : n + 1], torch.zeros(1, dtype=torch.long))], order=2, dtype=F64
        )
        torch.testing.assert_close(alone[0], coeffs[n], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(coeffs[:3], per_input_class_reference(model, theta, d, x[:3]), rtol=1e-10, atol=1e-12)
    # float32 by default, close to float64
    c32 = logit_derivatives(model.float(), {k: v.float() for k, v in theta.items()}, d, data, order=2)
    assert c32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), coeffs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ batching, BN


def test_uneven_last_batch_is_weighted_exactly() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 3, 4), num_classes=C, hidden=(8,))
    data = toy_dataset(53)
    d = random_direction(model, seed=3)
    d = {k: v.float() for k, v in d.items()}
    theta = model.state_dict()
    whole = [(data.normalize(data.images), data.labels)]
    for method in ("jvp", "hvp"):
        a = loss_derivatives(model, theta, d, data, order=2, method=method, batch_size=50)
        b = loss_derivatives(model, theta, d, data, order=2, method=method, batch_size=53)
        c = loss_derivatives(model, theta, d, whole, order=2, method=method)
        assert a.n_examples == b.n_examples == c.n_examples == 53
        torch.testing.assert_close(a.coefficients, b.coefficients, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.coefficients, c.coefficients, rtol=1e-6, atol=1e-7)
    assert a.coefficients[0].item() == pytest.approx(
        F.cross_entropy(model.eval()(whole[0][0]), data.labels).item(), rel=1e-6
    )
    la = logit_derivatives(model, theta, d, data, order=2, batch_size=50)
    assert la.shape == (53, C, 3)
    torch.testing.assert_close(la, logit_derivatives(model, theta, d, whole, order=2))
    assert loss_derivatives(model, theta, d, data, max_examples=20, batch_size=7).n_examples == 20


def test_batchnorm_model_eval_mode_unchanged() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 6, 6), num_classes=C, norm="batchnorm")
    data = toy_dataset(10, (3, 6, 6))
    x, y = data.normalize(data.images), data.labels
    with torch.no_grad():
        for _ in range(3):
            model.train()(x)  # non-trivial running statistics
    model.train()
    before = state(model)
    d = {k: 0.1 * v for k, v in random_direction(model, seed=4).items()}
    jv = loss_derivatives(model, before, d, data, order=2, method="jvp", batch_size=4)
    hv = loss_derivatives(model, before, d, data, order=2, method="hvp", batch_size=4)
    logits = logit_derivatives(model, before, d, data, order=2, batch_size=4)
    assert model.training  # not switched to eval
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(jv.coefficients, hv.coefficients, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        z = model.eval()(x)  # eval mode: the point's own running statistics
    assert jv.coefficients[0].item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-5)
    torch.testing.assert_close(logits[..., 0], z, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------ taylor.py


def test_taylor_polynomial_hand_values() -> None:
    c = [1.0, 2.0, 6.0]  # f = 1 + 2t + 3t²
    torch.testing.assert_close(taylor_polynomial(c, [0.0, 1.0, 2.0], 2), torch.tensor([1.0, 6.0, 17.0], dtype=F64))
    torch.testing.assert_close(taylor_polynomial(c, [0.0, 1.0, 2.0], 1), torch.tensor([1.0, 3.0, 5.0], dtype=F64))
    torch.testing.assert_close(taylor_polynomial(c, 0.5, 0), torch.tensor(1.0, dtype=F64))
    coeffs = torch.tensor([[[1.0, 2.0, 6.0], [0.0, -1.0, 2.0]]])  # (1, 2, 3)
    out = taylor_polynomial(coeffs, torch.tensor([-1.0, 3.0]), 2)
    assert out.shape == (1, 2, 2)
    torch.testing.assert_close(out, torch.tensor([[[2.0, 34.0], [2.0, 6.0]]], dtype=F64))
    assert taylor_polynomial([0, 0, 0, 6.0], 2.0, 3).item() == 8.0  # t³
    with pytest.raises(ValueError, match="order"):
        taylor_polynomial(c, [1.0], 3)


def test_path_approximations_centred_at_b_use_minus_d() -> None:
    """On a deep linear network both order-6 approximations reproduce L(θ_λ) exactly; B's needs −d."""
    depth = 3
    model_a = deep_linear(depth, seed=0)
    theta_a = state(model_a)
    theta_b = moved(theta_a, random_direction(model_a, scale=0.5, seed=5), 1.0)
    data = batches()
    ca, cb = path_coefficients(model_a, theta_a, theta_b, data, order=2 * depth, loss_fn=squared_error, dtype=F64)
    lambdas = [i / 8 for i in range(9)]
    truth = torch.tensor(
        [
            mean_loss(model_a, {k: (1 - x) * theta_a[k] + x * theta_b[k] for k in theta_a}, data, squared_error)
            for x in lambdas
        ],
        dtype=F64,
    )
    approx = path_approximations(ca, cb, lambdas, orders=(1, 2, 2 * depth))
    assert [(s.center, s.order) for s in approx] == [(c, k) for k in (1, 2, 2 * depth) for c in "ab"]
    assert [s.name for s in approx][:2] == ["a1", "b1"]
    with pytest.raises(KeyError, match="no approximation"):
        approx.at("a", 3)
    torch.testing.assert_close(approx.at("a", 2 * depth), truth, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(approx.at("b", 2 * depth), truth, rtol=1e-10, atol=0.0)
    assert approx.at("a", 1)[0].item() == pytest.approx(truth[0].item())
    assert approx.at("b", 2)[-1].item() == pytest.approx(truth[-1].item())
    # with +d at B the odd orders flip sign and the reconstruction fails
    d = direction(theta_a, theta_b, parameter_names(model_a))
    wrong = loss_derivatives(model_a, theta_b, d, data, order=2 * depth, loss_fn=squared_error, dtype=F64).coefficients
    at_b = path_approximations(ca, wrong, lambdas, (2 * depth,)).at("b", 2 * depth)
    assert not torch.allclose(at_b, truth, rtol=1e-3)
    rows = taylor_rows(lambdas, ca, cb, orders=(1, 2), true_values=truth.tolist())
    assert len(rows) == 9 * 5
    assert {r["center"] for r in rows} == {"a", "b", "true"}
    r = next(r for r in rows if r["center"] == "a" and r["order"] == 2 and r["lambda"] == 0.5)
    assert r["value"] == pytest.approx(approx.at("a", 2)[4].item()) and r["error"] == pytest.approx(
        r["value"] - truth[4].item()
    )
    assert [(r["center"], r["order"]) for r in rows[::9]] == [("true", None), ("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    # the expansion points: (θ_A, d) and (θ_B, −d), d over the parameters only
    pd = path_direction(model_a, theta_a, theta_b)
    assert list(pd) == parameter_names(model_a)
    for center, (theta, v) in zip("ab", (centred_at(c, theta_a, theta_b, pd) for c in "ab")):
        assert theta is (theta_a if center == "a" else theta_b)
        for k in pd:
            expected = theta_b[k] - theta_a[k]
            assert torch.equal(v[k], expected if center == "a" else -expected)
    with pytest.raises(ValueError, match="center"):
        centred_at("c", theta_a, theta_b, pd)


def test_logit_rmse_hand_computation() -> None:
    ref = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])  # k = 1 for input 0, k = 0 for input 1
    true = torch.zeros(2, 2, 3)
    approx = torch.zeros(2, 2, 3)
    true[0, 0, 1], approx[0, 0, 1] = 2.0, 1.0  # λ0, input 0: error 1
    true[0, 1, 0], approx[0, 1, 0] = 1.0, 4.0  # λ0, input 1: error −3
    true[1, 0, 2] = 100.0  # not the argmax class: ignored
    approx[1, 1, 0] = 2.0  # λ1, input 1: error −2
    torch.testing.assert_close(logit_errors(true, approx, ref), torch.tensor([[1.0, -3.0], [0.0, -2.0]], dtype=F64))
    torch.testing.assert_close(logit_rmse(true, approx, ref), torch.tensor([math.sqrt(5.0), math.sqrt(2.0)], dtype=F64))
    with pytest.raises(ValueError):
        logit_rmse(true, approx[:, :1], ref)


def test_interpolated_outputs_hand_values() -> None:
    z_a = torch.tensor([[1.0, -2.0, 0.0], [4.0, 0.0, 2.0]])
    z_b = torch.tensor([[3.0, 2.0, 0.0], [0.0, 0.0, -2.0]])
    got = interpolated_outputs(z_a, z_b, [0.0, 0.25, 1.0])
    assert got.shape == (3, 2, 3) and got.dtype == F64
    torch.testing.assert_close(got[0], z_a.double(), rtol=0, atol=0)
    torch.testing.assert_close(got[1], torch.tensor([[1.5, -1.0, 0.0], [3.0, 0.0, 1.0]], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(got[2], z_b.double(), rtol=0, atol=0)


def test_interpolated_logits_and_fig8_pipeline_on_a_deep_linear_path() -> None:
    depth = 2
    model_a, model_b = deep_linear(depth, seed=0).float(), deep_linear(depth, seed=1).float()
    theta_a, theta_b = model_a.state_dict(), model_b.state_dict()
    data = [(x.float(), y) for x, y in batches()]
    lambdas = [0.0, 0.25, 0.5, 1.0]
    true = interpolated_logits(model_a, theta_a, theta_b, data, lambdas)
    assert true.shape == (4, 12, C)
    torch.testing.assert_close(true[0], logits_at(model_a, theta_a, data))
    torch.testing.assert_close(true[-1], logits_at(model_b, theta_b, data))
    ca, cb = path_coefficients(model_a, theta_a, theta_b, data, order=depth, kind="logits")
    assert ca.shape == cb.shape == (12, C, depth + 1)
    approx = path_approximations(ca, cb, lambdas, orders=(1, depth))
    exact_a = approx.at("a", depth).permute(2, 0, 1)
    exact_b = approx.at("b", depth).permute(2, 0, 1)
    assert logit_rmse(true, exact_a, true[0]).max() < 1e-4
    assert logit_rmse(true, exact_b, true[0]).max() < 1e-4
    linear = logit_rmse(true, approx.at("a", 1).permute(2, 0, 1), true[0])
    assert linear[0] < 1e-5 and linear[-1] > 1e-2
