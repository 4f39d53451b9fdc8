"""Draw the figures of the docs' geometry page with psiopt's own code.

Every geometric quantity drawn here (horizontal projections, Riemannian gradients,
retractions, exponential maps, angles between classes) is computed by
:class:`psiopt.PSIManifold`, so the pictures show what the package does, not a
re-derivation. Run from the repository root::

    .venv/bin/python docs/scripts/make_figures.py            # writes docs/figures/*.png
    .venv/bin/python docs/scripts/make_figures.py --out DIR  # somewhere else

The output is deterministic (fixed seeds) and takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import psiopt  # noqa: E402

__all__ = ["main", "FIGURES"]

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "figures"
DPI = 130


def _rayleigh(a: torch.Tensor):
    """The scale-invariant loss :math:`f(w) = w^T A w / w^T w` and its Euclidean gradient."""

    def loss(w: torch.Tensor) -> torch.Tensor:
        return (w @ a @ w) / (w @ w)

    def grad(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(w), w)
        return g

    return loss, grad


def _a_2d() -> torch.Tensor:
    rot = torch.tensor([[math.cos(0.5), -math.sin(0.5)], [math.sin(0.5), math.cos(0.5)]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)) @ rot.T


def figure_quotient(out: Path) -> Path:
    """A 2-D weight, its class (a ray), the quotient (the circle), the two subspaces."""
    m = psiopt.PSIManifold("tensor")  # one group: the whole 2-vector
    loss, grad = _rayleigh(_a_2d())

    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    lim = 2.6
    xs = torch.linspace(-lim, lim, 301, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    a = _a_2d()
    values = ((pts @ a) * pts).sum(1) / (pts * pts).sum(1).clamp_min(1e-12)
    ax.contourf(gx, gy, values.reshape(gx.shape), levels=24, cmap="Blues", alpha=0.55)
    circle = torch.linspace(0, 2 * math.pi, 400)
    ax.plot(torch.cos(circle), torch.sin(circle), color="k", lw=1.2, label="unit circle = the quotient $S^1$")

    w = torch.tensor([0.55, 0.45], dtype=torch.float64)
    w = w / w.norm() * 0.9
    ray_end = w / w.norm() * lim * 1.4
    ax.plot([0, ray_end[0]], [0, ray_end[1]], color="tab:red", lw=2.0, ls="--", label=r"class $[w]=\{a w: a>0\}$ (a ray)")
    for scale, marker in ((1.0, "o"), (2.0, "s")):
        p = w * scale
        g = grad(p)
        # The Euclidean gradient is already horizontal (<g, w> = 0); proju shows it.
        g_h = m.proju(p, g)
        assert torch.allclose(g, g_h, atol=1e-12)
        ax.plot(*p, marker=marker, color="tab:red", ms=8, zorder=5)
        ax.annotate(
            "", xy=(p - 0.9 * g)[:2].tolist(), xytext=p.tolist(),
            arrowprops=dict(arrowstyle="-|>", color="tab:green", lw=2),
        )
        ax.text(*(p + torch.tensor([-0.32, 0.08], dtype=torch.float64)).tolist(),
                f"${'' if scale == 1 else '2'}w$", fontsize=12, color="tab:red")
    ax.plot([], [], color="tab:green", lw=2, label=r"$-\nabla f$ at $w$ and $2w$ (half as long)")

    # Vertical and horizontal directions at w, drawn as short segments.
    unit = w / w.norm()
    horiz = torch.tensor([-unit[1], unit[0]], dtype=torch.float64)
    assert abs(float(m.proju(w, horiz) @ horiz) - 1.0) < 1e-12  # horizontal is its own projection
    assert float(m.proju(w, unit).norm()) < 1e-12  # the vertical direction projects to zero
    for direction, color, label in ((unit, "tab:purple", "vertical $V_w$ (along the class)"),
                                    (horiz, "tab:orange", r"horizontal $H_w$ ($\perp w$)")):
        seg = torch.stack([w - 0.55 * direction, w + 0.55 * direction])
        ax.plot(seg[:, 0], seg[:, 1], color=color, lw=3, alpha=0.9, label=label)

    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.6", lw=0.5)
    ax.axvline(0, color="0.6", lw=0.5)
    ax.set_xlabel("$w_1$")
    ax.set_ylabel("$w_2$")
    ax.set_title(r"A scale-invariant loss $f(w)=w^\top A w / w^\top w$ in $\mathbb{R}^2$" "\n(shading: $f$, constant along every ray)")
    ax.legend(loc="lower left", fontsize=8.5, framealpha=0.95)
    path = out / "quotient.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def figure_retraction_vs_expmap(out: Path) -> Path:
    """Where the retraction and the exponential map send a horizontal step."""
    m = psiopt.PSIManifold("tensor")
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.6))

    t = 1.2
    xi = torch.tensor([0.0, t], dtype=torch.float64)  # horizontal: <xi, w> = 0
    retracted = m.retr(w, xi)
    exp = m.expmap(w, xi)
    circle = torch.linspace(0, 2 * math.pi, 400)
    left.plot(torch.cos(circle), torch.sin(circle), color="k", lw=1)
    left.annotate("", xy=retracted.tolist(), xytext=w.tolist(), arrowprops=dict(arrowstyle="-|>", color="tab:blue", lw=2))
    left.plot(*retracted, "o", color="tab:blue", ms=7)
    left.text(retracted[0] + 0.05, retracted[1], r"$R_w(\xi) = w+\xi$", color="tab:blue")
    rep = m.projx(retracted)  # the unit representative of the retracted class
    left.plot([0, retracted[0]], [0, retracted[1]], color="tab:blue", ls=":", lw=1)
    left.plot(*rep, "o", mfc="white", color="tab:blue", ms=7)
    arc = torch.linspace(0, t, 100)
    left.plot(torch.cos(arc), torch.sin(arc), color="tab:red", lw=3, alpha=0.6)
    left.plot(*exp, "o", color="tab:red", ms=7)
    left.text(exp[0] - 0.95, exp[1] + 0.05, r"$\mathrm{Exp}_w(\xi)$", color="tab:red")
    left.plot(*w, "ko", ms=6)
    left.text(w[0] + 0.05, w[1] - 0.15, "$w$")
    left.set_aspect("equal")
    left.set_xlim(-1.4, 1.8)
    left.set_ylim(-0.5, 1.6)
    left.set_title(r"one horizontal step $\xi$, $\|\xi\|/\|w\| = %.1f$" % t)

    ratios = torch.linspace(0.0, 3.0, 121, dtype=torch.float64)
    angle_retr, angle_exp = [], []
    for r in ratios:
        step = torch.tensor([0.0, float(r)], dtype=torch.float64)
        angle_retr.append(float(m.group_angles(w, m.retr(w, step))[0]))
        angle_exp.append(float(m.group_angles(w, m.expmap(w, step))[0]))
    right.plot(ratios, angle_exp, color="tab:red", lw=2, label=r"exponential map: $\theta$")
    right.plot(ratios, angle_retr, color="tab:blue", lw=2, label=r"retraction: $\arctan\theta$")
    right.set_xlabel(r"step length $\theta = \|\xi\|/\|w\|$")
    right.set_ylabel("angle moved by the class (rad)")
    right.set_title("they agree to second order, then the retraction lags")
    right.grid(alpha=0.3)
    right.legend()
    path = out / "retraction-vs-expmap.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _bn_mlp(seed: int, init_scale: float) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 64, bias=False), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
        torch.nn.Linear(64, 64, bias=False), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
        torch.nn.Linear(64, 5),
    )
    with torch.no_grad():
        net[0].weight.mul_(init_scale)
        net[3].weight.mul_(init_scale)
    return net


def figure_effective_step(out: Path, steps: int = 400) -> Path:
    """SGD on a BN network: the weight norms grow and the effective step shrinks."""
    m = psiopt.PSIManifold("channel")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=gen)
    y = (x[:, :5] @ torch.randn(5, 5, generator=gen)).argmax(1)
    lr = 1.0

    fig, (ax_norm, ax_step) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    for init_scale, color in ((0.3, "tab:blue"), (1.0, "tab:green"), (3.0, "tab:red")):
        net = _bn_mlp(0, init_scale)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        sq_norms, angles = [], []
        for step in range(steps):
            idx = torch.randint(0, 512, (64,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            w_before = net[3].weight.detach().clone()
            opt.step()
            w_after = net[3].weight.detach()
            # Each filter's squared norm, and the angle SGD actually turned it by.
            sq_norms.append(float(psiopt.manifold.group_sq_norms(m.rows(w_after)).mean()))
            angles.append(float(m.group_angles(w_before, w_after).mean()))
        sq = torch.tensor(sq_norms)
        ax_norm.plot(sq, color=color, label=f"init scale {init_scale:g}")
        ax_step.plot(lr / sq, color=color, lw=2, label=f"lr / mean $\\|w_j\\|^2$, init {init_scale:g}")
        ax_step.plot(torch.tensor(angles), color=color, lw=0.6, alpha=0.6)
    ax_step.plot([], [], color="0.4", lw=0.6, label="thin: angle turned per step (rad)")
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("SGD step")
    ax_norm.set_ylabel(r"mean $\|w_j\|^2$ (second layer's filters)")
    ax_norm.set_title("the norms only grow")
    ax_step.set_yscale("log")
    ax_step.set_xlabel("SGD step")
    ax_step.set_ylabel("effective step")
    ax_step.set_title(r"lr$/\|w_j\|^2$: set by the initial scale, then decaying")
    for ax in (ax_norm, ax_step):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"torch.optim.SGD (lr={lr:g}) on a 2-BN-layer MLP: one function, three initial scales")
    path = out / "sgd-effective-step.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def figure_bn_eps(out: Path) -> Path:
    """How far BatchNorm's eps breaks the scale invariance, measured and predicted."""
    torch.manual_seed(0)
    z = torch.randn(256, 8, dtype=torch.float64) * torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(8, eps=1e-5).double().train()
    exact = (z - z.mean(0)) / z.std(0, unbiased=False)  # eps = 0: exactly invariant
    var = z.var(0, unbiased=False)
    scales = torch.logspace(-4, 1, 60, dtype=torch.float64)
    measured, predicted = [], []
    with torch.no_grad():
        for c in scales:
            out_c = bn(c * z)
            measured.append(float(((out_c - exact).norm(dim=0) / exact.norm(dim=0)).mean()))
            ratio = bn.eps / (c * c * var)
            predicted.append(float((1 - 1 / torch.sqrt(1 + ratio)).mean()))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.loglog(scales, measured, "o", ms=4, color="tab:blue", label="measured: torch BatchNorm1d, eps=1e-5")
    ax.loglog(scales, predicted, color="tab:red", label=r"$1 - (1+\epsilon/(c^2\sigma^2))^{-1/2} \approx \epsilon/(2c^2\sigma^2)$")
    ax.set_xlabel(r"scale $c$ of the weights feeding BN")
    ax.set_ylabel("relative error vs. the exactly invariant output")
    ax.set_title("BN is scale invariant only while $c^2\\sigma^2 \\gg \\epsilon$")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    path = out / "bn-eps.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def figure_equivalent_starts(out: Path, steps: int = 150) -> Path:
    """Runs from w0 and a*w0: distance between their classes, SGD vs PSISGD."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=gen, dtype=torch.float64)
    y = (x[:, :5] @ torch.randn(5, 5, generator=gen, dtype=torch.float64)).argmax(1)
    order = torch.randint(0, 512, (steps, 64), generator=gen)
    m = psiopt.PSIManifold("channel")
    scale = torch.logspace(-1, 1, 64, dtype=torch.float64).unsqueeze(1)  # 0.1 ... 10, one per filter

    def run(optimizer_name: str, rescale: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        net = torch.nn.Sequential(
            torch.nn.Linear(20, 64, bias=False), torch.nn.BatchNorm1d(64, eps=1e-12), torch.nn.ReLU(),
            torch.nn.Linear(64, 5),
        ).double()
        if rescale:
            with torch.no_grad():
                net[0].weight.mul_(scale)
        if optimizer_name == "PSISGD":
            psiopt.mark_scale_invariant(net, x[:128])
            opt = psiopt.PSISGD(net.parameters(), lr=0.05, momentum=0.9)
        else:
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        weights = []
        for idx in order:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            weights.append(net[0].weight.detach().clone())
        return weights

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, color in (("SGD", "tab:red"), ("PSISGD", "tab:blue")):
        a, b = run(name, False), run(name, True)
        gaps = [max(float(m.dist(u, v)), 1e-17) for u, v in zip(a, b)]
        ax.semilogy(range(1, steps + 1), gaps, color=color, lw=2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(r"dist$([w_t], [w'_t])$ (rad)")
    ax.set_title("two runs from equivalent weights $w_0$ and $a\\cdot w_0$, $a_j \\in [0.1, 10]$")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    path = out / "equivalent-starts.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


FIGURES = (figure_quotient, figure_retraction_vs_expmap, figure_effective_step, figure_bn_eps, figure_equivalent_starts)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    paths = [make(args.out) for make in FIGURES]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
