"""Cost of the full second-order analysis of one pair relative to the 25-point path alone.

Second-order analysis = the 25-point path (loss/accuracy at 25 λ) plus the order-2 Taylor
coefficients of the loss centred at both ends (∇L·d and dᵀ∇²L d at θ_A along d, at θ_B along −d).
Both measured in this process on the same data; the models are random inits (the cost does not
depend on training).

    python bench/second_order_cost.py [--device cuda] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import time

import torch

from lmclab.curvature.derivatives import loss_derivatives
from lmclab.data import DeviceDataset
from lmclab.models import build_model
from lmclab.paths import default_lambdas, evaluate_path
from lmclab.points import direction, parameter_names


def timed(fn, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def case(
    name: str,
    dataset: str,
    model_name: str,
    options: dict,
    examples: int | None,
    device: torch.device,
    data_dir: str | None,
    order: int,
) -> dict:
    """Time the path and the derivatives at both ends (fastest of 2); prints one line and returns the numbers."""
    data = DeviceDataset.load(dataset, "test", data_dir=data_dir, device=device, subset=examples, progress=False)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(
            build_model(model_name, input_shape=data.info.input_shape, num_classes=data.info.num_classes, **options)
            .to(device)
            .eval()
        )
    theta_a, theta_b = models[0].state_dict(), models[1].state_dict()
    d = direction(theta_a, theta_b, parameter_names(models[0]))
    minus_d = {k: -v for k, v in d.items()}
    lambdas = default_lambdas(25)
    path = lambda: evaluate_path(models[0], theta_a, theta_b, {"test": data}, lambdas=lambdas, progress=False)  # noqa: E731

    def derivatives() -> None:
        loss_derivatives(models[0], theta_a, d, data, order=order)
        loss_derivatives(models[0], theta_b, minus_d, data, order=order)

    path()  # warm-up
    t_path = min(timed(path, device) for _ in range(2))
    t_deriv = min(timed(derivatives, device) for _ in range(2))
    print(
        f"{name:<32} path(25 λ) {t_path:7.2f} s   order-{order} at both ends {t_deriv:7.2f} s   "
        f"full analysis / path = {(t_path + t_deriv) / t_path:5.2f}x   ({len(data)} examples)",
        flush=True,
    )
    return {
        "case": name,
        "path_s": t_path,
        "derivatives_s": t_deriv,
        "ratio": (t_path + t_deriv) / t_path,
        "examples": len(data),
        "order": order,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--order", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}"
    )
    case("MLP 784-512³-10 / MNIST test", "mnist", "mlp", {}, None, device, args.data_dir, args.order)
    case(
        "ResNet-20 ×1 LN / CIFAR-10 test",
        "cifar10",
        "resnet20",
        {"width": 1},
        1000 if device.type == "cpu" else None,
        device,
        args.data_dir,
        args.order,
    )


if __name__ == "__main__":
    main()
