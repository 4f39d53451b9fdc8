"""``psiopt bench`` end to end in --quick mode: outputs, schema, numbers from the run, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from psiopt.bench.records import to_json
from psiopt.bench.report import fmt, load_results, load_schema, validate_results
from psiopt.cli import main
from test_bench_data import write_cifar_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two quick default-suite runs that differ only in their seed."""
    runs = {}
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"quick{seed}")
        code = main(["bench", "--quick", "--no-progress", "--seeds", str(seed), "--out", str(out)])
        assert code == 0
        runs[seed] = out
    return runs


def _load(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_quick_run_writes_valid_outputs(quick_runs, capsys):
    out = quick_runs[0]
    results = _load(out)
    validate_results(results)
    assert results["complete"] and not results["interrupted"] and results["quick"]
    env = results["environment"]
    assert env["torch_version"] == torch.__version__ and env["device"] == "cpu"
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    # every part of the suite produced results
    assert [t["task"] for t in results["training"]] == ["digits-mlp", "mnist5k-cnn", "stdlib-lm"]
    methods = {m["method"]: m for m in results["training"][0]["methods"]}
    assert {"sgd", "psisgd", "psiadam", "psiadamw", "rsgd-sphere", "sgdp", "sgdg", "wn", "enorm", "sbwn"} <= set(methods)
    for name, m in methods.items():  # every method's weight decay, as its optimizer got it
        assert m["weight_decay"] == results["config"]["methods"][name]["weight_decay"]
    assert methods["sgd"]["weight_decay"] == methods["psisgd"]["weight_decay"] == 5e-4
    assert methods["adamw"]["weight_decay"] == methods["psiadamw"]["weight_decay"] == 1e-2
    # the three parts of the data, recorded; the tuning runs and the lr chosen on validation
    digits = results["training"][0]
    assert digits["dataset"]["val_size"] > 0 and digits["metric"] == "accuracy"
    for m in digits["methods"]:
        ok = [t for t in m["tuning"] if not t["diverged"]]
        best = min(ok, key=lambda t: (t["final_val_loss"], t["lr"]))  # the lowest validation loss
        assert m["best_lr"] == best["lr"] and m["runs"][0]["final_test_acc"] is not None
    # the language model: its text recorded, the lr chosen by validation loss, discovery's finding recorded
    lm = results["training"][2]
    text = lm["dataset"]["text"]
    assert text["python_version"] == env["python_version"].split()[0] and len(text["test_sha256"]) == 64
    assert lm["metric"] == "loss" and lm["target_on"] == "val_loss"
    for m in lm["methods"]:
        ok = [t for t in m["tuning"] if not t["diverged"]]
        assert m["best_lr"] == min(ok, key=lambda t: (t["final_val_loss"], t["lr"]))["lr"]
        assert m["runs"][0]["final_test_loss"] is not None
    from psiopt import find_scale_invariant
    from psiopt.bench.models import build

    model = build(lm["model"], lm["model_kwargs"], 256)
    assert lm["scale_invariant"] == sorted(find_scale_invariant(model, torch.randint(0, 256, (4, 16))).names())
    assert {v["task"] for v in results["verdicts"]} <= {"digits-mlp", "mnist5k-cnn", "stdlib-lm"}
    assert {v["target"] for v in results["verdicts"] if v["task"] == "stdlib-lm"} == {"adaptive", "psiadamw-vs-adamw"}
    assert results["scale_sweep"] and results["full_batch"] and results["step_time"]
    fb_methods = {r["method"] for p in results["full_batch"] for r in p["runs"]}
    assert fb_methods == {"gd", "psigd", "psigd-ls", "rsgd-sphere"}
    assert results["unavailable_methods"] == {}
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert {"digits-mlp-loss-vs-steps.png", "digits-mlp-loss-vs-time.png", "digits-mlp-scale-sweep.png",
            "digits-mlp-lr-sensitivity.png", "stdlib-lm-loss-vs-steps.png", "stdlib-lm-lr-sensitivity.png",
            "full-batch.png"} <= set(results["plots"])
    assert any(p.startswith("step-time-") for p in results["plots"])
    assert {"step-time-scaling-cpu.png", "step-time-scaling-adam-cpu.png"} <= set(results["plots"])
    assert (out / "report.md").is_file()
    # the step-time curve covers every path at every size of the suite, and discovery ran
    sizes = [p["num_params"] for p in results["step_time_scaling"]]
    assert len(sizes) == 2 and sizes[0] < sizes[1]
    for point in results["step_time_scaling"]:
        assert [e["path"] for e in point["paths"]] == [
            "sgd-foreach", "sgd-fused", "psisgd-loop", "psisgd-foreach", "psisgd-fused", "psisgd-constant-foreach",
            "psisgd-constant-fused", "psiadasgd-fused",
            "adamw-foreach", "adamw-fused", "psiadamw-foreach", "psiadamw-fused", "psiadam-fused",
        ]
        assert all(e["status"] == "ok" and e["step_peak_extra_bytes"] is not None for e in point["paths"])
    # on the zoo's ResNet-50 and on a transformers language model (Qwen3)
    assert [d["model"] for d in results["discovery_time"]] == ["resnet50", "Qwen3ForCausalLM"]
    for discovery in results["discovery_time"]:
        assert discovery["found"] == discovery["expected"] > 0 and discovery["threads"] == 1
    # the typed records read back to exactly the JSON that was written
    assert to_json(load_results(out / "results.json")) == results


def test_schema_rejects_broken_results(quick_runs):
    results = _load(quick_runs[0])
    broken = json.loads(json.dumps(results))
    del broken["environment"]["torch_version"]
    with pytest.raises(jsonschema.ValidationError):
        validate_results(broken)
    broken = json.loads(json.dumps(results))
    broken["training"][0]["methods"][0]["runs"][0]["final_test_acc"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        validate_results(broken)
    broken = json.loads(json.dumps(results))
    broken["step_time_scaling"][0]["paths"][0]["status"] = "skipped"
    with pytest.raises(jsonschema.ValidationError):
        validate_results(broken)
    broken = json.loads(json.dumps(results))
    del broken["discovery_time"][0]["target_s"]
    with pytest.raises(jsonschema.ValidationError):
        validate_results(broken)
    assert load_schema()["$schema"].endswith("2020-12/schema")


def test_report_numbers_come_from_the_json(quick_runs):
    for out in quick_runs.values():
        results = _load(out)
        report = (out / "report.md").read_text()
        for task in results["training"]:
            for m in task["methods"]:
                if m["status"] != "ok":
                    continue
                s = m["summary"]
                assert f"{fmt(s['final_loss_mean'])} ± {fmt(s['final_loss_se'])}" in report
                if task["metric"] == "accuracy":
                    assert f"{fmt(s['test_acc_mean'])} ± {fmt(s['test_acc_se'])}" in report
                else:
                    assert f"{fmt(s['test_loss_mean'])} ± {fmt(s['test_loss_se'])}" in report
                assert f"({s['reached_target']}/{s['seeds']})" in report
                for t in m["tuning"]:  # the validation loss that chose the lr
                    assert f"({fmt(t['final_val_loss'], 3)})" in report or t["diverged"]
                assert f"{len(m['basin'])}/{len(task['lr_grid'])}" in report
        for v in results["verdicts"]:
            assert f"| {v['task']} | {v['target']} | {v['status']} |" in report
        for sweep in results["scale_sweep"]:
            for m in sweep["methods"]:
                assert fmt(m["final_loss_spread"]) in report
        for p in results["full_batch"]:
            for r in p["runs"]:
                if r["measured_rate"] is not None:
                    assert fmt(r["measured_rate"], 6) in report
        for st in results["step_time"]:
            for m in st["methods"]:
                if m["status"] == "ok":
                    assert fmt(m["ratio_to_baseline"], 3) in report
        for point in results["step_time_scaling"]:
            for e in point["paths"]:
                if e["status"] == "ok":
                    # each family against its own peers: SGD's, or AdamW's
                    ratios = ("ratio_to_adamw_foreach", "ratio_to_adamw_fused") if e["family"] == "adam" else (
                        "ratio_to_sgd_foreach", "ratio_to_sgd_fused")  # fmt: skip
                    row = f"| {e['label']} | {fmt(e['median_s'] * 1e3, 3)} | {fmt(e[ratios[0]], 3)} | {fmt(e[ratios[1]], 3)} |"
                    assert row in report
                else:
                    assert f"`{e['label']}` on cpu: {e['status']}: {e['reason'].splitlines()[0]}" in report
        for d in results["discovery_time"]:
            assert f"find_scale_invariant took {fmt(d['median_s'], 3)} s" in report
            assert f"{d['found']} / {d['expected']}" in report
        assert f"wall time {fmt(results['wall_time_s'])} s" in report


def test_seeds_change_what_they_should(quick_runs):
    a, b = _load(quick_runs[0]), _load(quick_runs[1])
    assert a["config"]["seeds"] == [0] and b["config"]["seeds"] == [1]
    losses_a = [r["final_loss"] for t in a["training"] for m in t["methods"] for r in m["runs"]]
    losses_b = [r["final_loss"] for t in b["training"] for m in t["methods"] for r in m["runs"]]
    assert len(losses_a) == len(losses_b) and losses_a != losses_b
    report_a, report_b = ((quick_runs[s] / "report.md").read_text() for s in (0, 1))
    assert report_a != report_b
    # the Rayleigh problems do not depend on the training seeds: same iteration counts
    its_a = [r["iterations"] for p in a["full_batch"] for r in p["runs"]]
    its_b = [r["iterations"] for p in b["full_batch"] for r in p["runs"]]
    assert its_a == its_b


def test_psi_methods_are_scale_invariant_in_the_sweep(quick_runs):
    results = _load(quick_runs[0])
    sweep = {m["method"]: m for m in results["scale_sweep"][0]["methods"]}
    sgd = sweep["sgd"]["final_loss_spread"]
    assert sgd is not None and sgd > 1e-3
    for name in ("psisgd", "rsgd-sphere", "sbwn"):
        spread = sweep[name]["final_loss_spread"]
        assert spread is not None and spread < 0.1 * sgd, name
    fb = results["full_batch"]
    for kappa in {p["condition_number"] for p in fb}:
        counts = {p["init_scale"]: {r["method"]: r["iterations"] for r in p["runs"]} for p in fb if p["condition_number"] == kappa}
        psi = {c["psigd"] for c in counts.values()}
        assert len(psi) == 1 and None not in psi
        assert counts[1.0]["gd"] is not None and counts[0.01]["gd"] is None


def test_stdout_table(tmp_path, capsys):
    code = main(["bench", "--suite", "full-batch", "--quick", "--out", str(tmp_path / "fb")])
    assert code == 0
    out = capsys.readouterr().out
    assert "iterations to f - f* <=" in out and "psigd-ls" in out
    results = _load(tmp_path / "fb")
    validate_results(results)
    for problem in results["full_batch"]:
        for run in problem["runs"]:
            shown = fmt(run["iterations"]) if run["iterations"] is not None else f"> {run['max_iters']}"
            assert re.search(rf"{re.escape(run['method'])}\s+{re.escape(shown)}\s", out)


def test_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu", "full-batch", "step-time", "gpu", "psisgd", "sgdp", "enorm", "psigd-ls"):
        assert name in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--suite", "nope"], "unknown suite 'nope'; valid suites: cpu, full-batch, step-time, gpu, gpu-check"),
        (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
        (["--suite", "gpu", "--device", "cpu"], "--suite gpu needs --data-dir"),
        (["--suite", "gpu", "--device", "cpu", "--data-dir", "/nonexistent/cifar"], "does not exist"),
        (["--data-dir", "/tmp"], "--data-dir is only used by --suite gpu"),
        (["--synthetic"], "--synthetic applies to --suite gpu"),
    ],
)
def test_usage_errors(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["bench", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # checked before running anything


def test_invalid_cifar_dir(tmp_path, capsys):
    root = tmp_path / "cifar"
    write_cifar_dir(root)
    (root / "batches.meta").unlink()
    assert main(["bench", "--suite", "gpu", "--device", "cpu", "--data-dir", str(root), "--out", str(tmp_path / "o")]) == 2
    assert "lacks batches.meta" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_missing_cuda(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "CUDA device requested" in err and "--device cpu" in err
    assert main(["bench", "--suite", "gpu", "--synthetic", "--out", str(tmp_path / "o")]) == 2
    assert "gpu suite defaults to cuda" in capsys.readouterr().err


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["bench", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main(["bench", "--quick", "--out", str(blocker)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_gpu_suite_quick_on_a_generated_cifar_dir(tmp_path):
    root = tmp_path / "cifar"
    write_cifar_dir(root, per_batch=30, test=20)
    out = tmp_path / "gpu"
    code = main(["bench", "--suite", "gpu", "--quick", "--device", "cpu", "--no-progress",
                 "--data-dir", str(root), "--out", str(out)])
    assert code == 0
    results = _load(out)
    validate_results(results)
    assert [t["task"] for t in results["training"]] == ["cifar10-resnet18", "cifar10-vgg16"]
    dataset = results["training"][0]["dataset"]
    assert dataset["train_size"] + dataset["val_size"] == 128 and dataset["val_size"] > 0
    assert {st["model"] for st in results["step_time"]} == {"resnet18", "vgg16_bn"}


def test_python_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "psiopt.bench", "--suite", "gpu", "--synthetic", "--quick", "--device", "cpu",
         "--out", str(tmp_path / "syn")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = _load(tmp_path / "syn")
    validate_results(results)
    assert results["training"] == [] and len(results["step_time"]) == 2
    assert "ratio to SGD foreach" in proc.stdout


def test_docs_page_renders_this_protocol_and_marks_older_runs(quick_runs, tmp_path):
    import importlib.util
    import shutil
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("docs_hooks", Path(__file__).resolve().parents[1] / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    results_dir = tmp_path / "benchmarks" / "results"
    shutil.copytree(quick_runs[0], results_dir / "new")
    (results_dir / "old").mkdir()  # a run of the previous layout: version 2
    (results_dir / "old" / "results.json").write_text(json.dumps({**_load(quick_runs[0]), "schema_version": 2}))
    config = SimpleNamespace(config_file_path=str(tmp_path / "mkdocs.yml"))
    section = hooks.bench_section(config)
    new_part, old_part = section.split("## `benchmarks/results/old/results.json`")
    assert "Not yet measured with this protocol" in old_part and "|" not in old_part  # no numbers of it
    assert "## verdicts" in new_part and "learning-rate sensitivity" in new_part
    assert "benchmark-results/new/digits-mlp-lr-sensitivity.png" in new_part
