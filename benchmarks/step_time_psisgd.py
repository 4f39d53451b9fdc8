"""Step time of PSISGD against torch.optim.SGD on a ResNet-18 parameter set.

Only ``optimizer.step()`` is timed (gradients are fixed random tensors), with momentum
0.9, for ``foreach`` off and on. The convolution weights of the CIFAR-style ResNet-18
(every one feeds a BatchNorm) are PSI parameters; BN affine parameters and the head are
Euclidean. Prints median step times and the ratio PSISGD / SGD.

    python benchmarks/step_time_psisgd.py [--device cuda] [--width 64] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import geoopt
import torch
from torch import nn

import psiopt
from psiopt.bench.models import resnet18


def build_parameters(width: int, device: str) -> list[nn.Parameter]:
    model = resnet18(num_classes=10, width=width).to(device)
    params = []
    gen = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(module, nn.Conv2d) and name == "weight":
                p = geoopt.ManifoldParameter(p.detach(), manifold=psiopt.PSIManifold("channel"))
            p.grad = torch.randn(p.shape, generator=gen, device=device)
            params.append(p)
    return params


def median_step_seconds(optimizer: torch.optim.Optimizer, repeats: int, device: str) -> float:
    times = []
    for i in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # the first steps allocate momentum buffers
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64: 11.2M parameters)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    params = build_parameters(args.width, args.device)
    n_psi = sum(p.numel() for p in params if psiopt.is_scale_invariant(p))
    n_all = sum(p.numel() for p in params)
    print(f"ResNet-18 width {args.width} on {args.device}: {len(params)} tensors, {n_all:,} parameters "
          f"({n_psi:,} on the PSI manifold); torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'foreach':>8} {'SGD ms':>9} {'PSISGD ms':>10} {'ratio':>7}")
    for foreach in (False, True):
        sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=foreach)
        psi = psiopt.PSISGD(params, lr=0.1, momentum=0.9, foreach=foreach)
        t_sgd = median_step_seconds(sgd, args.repeats, args.device)
        t_psi = median_step_seconds(psi, args.repeats, args.device)
        print(f"{str(foreach):>8} {1e3 * t_sgd:9.2f} {1e3 * t_psi:10.2f} {t_psi / t_sgd:7.2f}")


if __name__ == "__main__":
    main()
