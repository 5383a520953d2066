"""The CUDA paths as far as a CPU exercises them, the GPU run's steps, its wheels, its report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench import audit, auto_table, cuda_run, device, measure, wheels
from bench.analysis import tidy
from bench.problems import zoo
from bench.problems.grid import GRIDS, Case, cases
from bench.run.cell import CaseData, hessian_call
from bench.vocabulary import WRONG

DATA = Path(__file__).parent / "data"


@pytest.fixture
def torch_flags():
    """TF32 switched on as a GPU's defaults have it; the session's settings restored after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def _unset(monkeypatch, *names: str) -> None:
    """Remove ``names`` from the environment, and whatever the test sets there after it."""
    for name in names:
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores the original
        monkeypatch.delenv(name)


def test_exact_float32_turns_tf32_off_in_torch_and_jax(torch_flags, monkeypatch):
    _unset(monkeypatch, "JAX_DEFAULT_MATMUL_PRECISION")
    assert device.precision()["tf32"] is True
    device.exact_float32()
    assert device.precision() == {"tf32": False, "float32_matmul_precision": "highest"}
    assert os.environ["JAX_DEFAULT_MATMUL_PRECISION"] == "highest"


def test_prepare_process_keeps_jax_to_its_share_and_the_worker_to_none(torch_flags, monkeypatch):
    _unset(monkeypatch, "JAX_DEFAULT_MATMUL_PRECISION", *device.WORKER_JAX_ENV)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")  # the user's own wins
    device.prepare_process()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2"
    assert "XLA_PYTHON_CLIENT_ALLOCATOR" not in os.environ
    device.prepare_process(worker=True)
    assert os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"
    assert not device.precision()["tf32"]


def test_sync_waits_for_cuda_only(monkeypatch):
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: waits.append(torch.device(d)))
    measure.sync("cpu")
    assert waits == []
    measure.sync("cuda")
    assert waits == [torch.device("cuda")]


def test_every_timed_call_on_cuda_is_between_two_waits(monkeypatch):
    """The call pytest-benchmark times waits for the device before and after the strategy."""
    case = Case(input=2, width=3, depth=1, output=1, activation="tanh", loss="mse", batch=4,
                dtype="float64", device="cuda")  # fmt: skip
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    batch = (torch.randn(4, 2).double(), torch.randn(4, 1).double())
    events = []
    monkeypatch.setattr(measure, "sync", lambda d: events.append(("sync", torch.device(d).type)))
    monkeypatch.setattr(measure, "warm_up", lambda d: events.append(("warm", torch.device(d).type)))
    # a stand-in with the registry's call: the waits are the call's, whatever the strategy
    strategy = SimpleNamespace(
        compute=lambda *a, **k: events.append(("compute", None)) or torch.zeros(13, 13)
    )
    call = hessian_call(strategy, CaseData(case, net, batch, None))
    assert events == [("warm", "cuda")]  # the process warmed up on the device, outside the call
    call()
    assert events[1:] == [("sync", "cuda"), ("compute", None), ("sync", "cuda")]


def test_cuda_peak_is_the_allocator_peak_above_what_was_held(monkeypatch):
    held = {"now": 100, "peak": 100}

    def allocate():
        held["peak"] = max(held["peak"], held["now"] + 900)
        return "H"

    def reset(d=None):
        held["peak"] = held["now"]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: held["now"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: held["peak"])
    held["peak"] = 10**6  # an earlier peak must not count
    assert measure.peak_and_events(allocate, "cuda") == ("H", 900, 0)


def test_zoo_model_moved_to_a_device_keeps_its_values():
    model = zoo.get("attention")
    net, params, batch, _ = zoo.build(model)
    net2, params2, batch2, _ = zoo.build(model, torch.device("cpu"))
    assert list(params) == list(params2) == list(model.params)
    assert all(p is dict(net2.named_parameters())[n] for n, p in params2.items())
    assert all(torch.equal(params[n], params2[n]) for n in params)
    assert torch.equal(batch[0], batch2[0]) and torch.equal(batch[1], batch2[1])


def test_audit_records_its_device_and_precision():
    result = audit.run_audit(["torch_func"], ["mlp_tanh"], known_bugs=False, on="cpu")
    assert (result["device"], result["tf32"]) == ("cpu", False)
    assert [r["status"] for r in result["records"]] == ["ok"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_audit_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert audit.main(["--device", "cuda", "--json", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "python -m bench.audit: error: --device cuda: CUDA is not available on this machine"
    )
    assert not (tmp_path / "a.json").exists()


def test_gpu_grid_is_default_and_large_with_cuda_beyond_the_cpu():
    for on in (("cpu",), ("cuda",)):
        ids = {c.id for c in cases("gpu", on)}
        assert ids == {c.id for c in cases("default", on)} | {c.id for c in cases("large", on)}
    assert max(c.P for c in cases("large", ("cpu",))) == 53_121
    biggest = max(cases("gpu", ("cuda",)), key=lambda c: c.P)
    assert biggest.P > 70_000
    # two float32 Hessians (a round's and the previous one) and JAX's share fit an H200
    assert 2 * biggest.hessian_bytes + 0.35 * 141 * 2**30 < 0.8 * 141 * 2**30
    assert GRIDS["gpu"][: len(GRIDS["default"])] == GRIDS["default"]


# --- wheels ---------------------------------------------------------------------------------


def test_missing_names_absent_and_too_old_distributions(monkeypatch):
    versions = {"pytest-benchmark": "5.2.3", "tqdm": "4.0"}

    def version(name):
        if name not in versions:
            raise wheels.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(wheels.importlib.metadata, "version", version)
    lacking = {w.name for w in wheels.missing()}
    assert lacking == {w.name for w in wheels.WHEELS} - {"tqdm"}
    versions["pytest-benchmark"] = "5.3.1"
    assert "pytest-benchmark" not in {w.name for w in wheels.missing()}


def _folder(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def _pure() -> list[str]:
    return [f"{w.name.replace('-', '_')}-{w.version}-py3-none-any.whl" for w in wheels.WHEELS]


def test_check_pure_accepts_the_pinned_set_and_refuses_the_rest(tmp_path):
    assert len(wheels.check_pure(_folder(tmp_path, _pure()))) == len(wheels.WHEELS)
    impure = [*_pure(), "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl"]
    with pytest.raises(ValueError, match="not pure-Python wheels: .*torch-2.11.0"):
        wheels.check_pure(_folder(tmp_path / "a", impure))
    with pytest.raises(ValueError, match=r"no wheel of \['pytest-benchmark'\]"):
        wheels.check_pure(_folder(tmp_path / "b", _pure()[1:]))


def test_install_asks_pip_for_the_missing_only_and_offline(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(wheels, "_pip", lambda *a: calls.append(a))
    monkeypatch.setattr(wheels, "missing", lambda: [])
    folder = _folder(tmp_path, _pure())
    assert wheels.install(folder, tmp_path / "site") == [] and calls == []
    monkeypatch.setattr(wheels, "missing", lambda: [wheels.WHEELS[0]])
    assert wheels.install(folder, tmp_path / "site") == [wheels.WHEELS[0]]
    (args,) = calls
    assert {"--no-index", "--no-deps", "--target"} <= set(args)
    assert args[-1] == "pytest-benchmark==5.3.1"


# --- the run's steps and summary -------------------------------------------------------------


@pytest.mark.parametrize("ignored", [False, True], ids=["sigint-as-is", "sigint-ignored"])
def test_a_step_past_its_deadline_gets_ctrl_c_and_keeps_what_it_wrote(tmp_path, ignored):
    """Also where the run itself was started with SIGINT ignored (``nohup ... &`` in a
    script), which its steps would otherwise inherit."""
    before = signal.getsignal(signal.SIGINT)
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _sleeper_stopped_at_its_deadline(tmp_path)
    finally:
        signal.signal(signal.SIGINT, before)


def _sleeper_stopped_at_its_deadline(tmp_path):
    script = (
        "import sys, time\n"
        "print('started', flush=True)\n"
        "try:\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        f"    open({str(tmp_path / 'kept')!r}, 'w').write('x'); sys.exit(2)\n"
    )
    step = cuda_run.run_step("sleeper", [sys.executable, "-c", script], tmp_path / "log", 1.0)
    assert (step.returncode, step.stopped) == (2, True)
    assert (tmp_path / "kept").exists() and "started" in (tmp_path / "log").read_text()


def test_run_json_falls_back_to_the_partial_file(tmp_path):
    path = tmp_path / "run.json"
    assert cuda_run.run_json(path) is None
    Path(f"{path}.partial").write_text("{}")
    assert cuda_run.run_json(path) == Path(f"{path}.partial")
    path.write_text("{}")
    assert cuda_run.run_json(path) == path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "huge"], "unknown grids ['huge']; valid grids: "),
        (["--devices", "tpu"], "unknown devices ['tpu']; valid devices: ['cpu', 'cuda']"),
        (["--minutes", "0"], "--minutes must be positive, got 0.0"),
        (["--wheels", "no-such-folder"], "--wheels no-such-folder is not a folder"),
    ],
)
def test_bad_arguments_are_one_line_before_any_work(tmp_path, capsys, args, message):
    assert cuda_run.main(["--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bench/cuda_run.sh: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_output_name():
    assert cuda_run.output_name(["cuda"], "gpu", "NVIDIA H200") == "nvidia-h200"
    assert cuda_run.output_name(["cpu"], "smoke", None) == "cpu-smoke"


def test_summary_quotes_kron_against_the_others_per_case(tmp_path):
    raw = json.loads((DATA / "bench_cuda.json").read_text())
    rows = [b for b in raw["benchmarks"] if b["extra_info"]["strategy"] == "torch_func"]
    for row in rows:  # kron at half torch_func's time, then one wrong cell
        kron = json.loads(json.dumps(row))
        kron["extra_info"]["strategy"] = kron["params"]["strategy"] = "kron"
        kron["stats"]["min"] = row["stats"]["min"] / 2
        kron["extra_info"]["vs_gemm"] = 3.0
        raw["benchmarks"].append(kron)
    raw["benchmarks"][-1]["extra_info"].update(status=WRONG, accurate=False, max_rel_err=0.5)
    (tmp_path / "run.json").write_text(json.dumps(raw))
    text = cuda_run.summary(tidy.load([tmp_path / "run.json"])[0])
    small, large = (r["extra_info"]["case"] for r in rows)
    assert f"| {small} | 1,377 | 0.5 | 3 | - |" in text
    assert f"| {large} | 4,801 | - | - | - |" in text
    assert "`kron` 1,377" in text and "`torch_func` 4,801" in text
    assert f"- `kron` on {large}: wrong: max_rel_err 0.5" in text


def test_auto_table_keeps_cuda_regimes_apart(tmp_path):
    inputs = [shutil.copy(DATA / n, tmp_path / n) for n in ("bench_cpu.json", "bench_cuda.json")]
    df, audits = tidy.load(inputs)
    table = auto_table.build(df, audits, inputs, "test")
    cuda = [r for r in table["regimes"] if r["device"] == "cuda"]
    assert [(r["P_min"], r["P_max"]) for r in cuda] == [(1000, 3000), (3000, 10000)]
    for regime in cuda:
        assert regime["machine"] == "gpuB / NVIDIA H100"
        times = [regime["time_s"][s] for s in regime["ranking"]]
        assert times == sorted(times) and set(regime["ranking"]) <= {
            "full_autograd", "torch_func", "vmap_jvp"
        }  # fmt: skip
    assert all(r["device"] == "cpu" for r in table["regimes"] if r not in cuda)
