"""The benchmark grid: case validation, expansion, named grids and the model factory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.analysis.rule import size_range
from bench.problems.grid import ARCH_KINDS, ARCHS, GRIDS, USER_ARCHS, Case, cases, expand
from bench.problems.models import chosen_params, make_problem
from strategies import kinds_on_path, kinds_signature, prepare


def _case(**changes) -> Case:
    fields = dict(
        input=8,
        width=32,
        depth=2,
        output=1,
        activation="tanh",
        loss="mse",
        batch=128,
        dtype="float32",
        device="cpu",
    )
    return Case(**{**fields, **changes})


def test_arch_kinds_are_the_kinds_of_every_net_of_the_arch():
    """ARCH_KINDS (what the analysis groups cases by, without building nets) is the
    signature ``auto`` costs every case of every grid by: the kinds of the modules its
    Hessian's derivatives pass through (the CNN whose last Linear alone is chosen is plain)."""
    seen = set()
    for grid in GRIDS:
        for case in cases(grid, ("cpu",)):
            net, batch, loss = make_problem(case)
            problem = prepare(net, chosen_params(case, net), batch, loss, nested_autograd=True)
            assert kinds_signature(kinds_on_path(problem)) == ARCH_KINDS.get(case.arch, ""), case.id
            seen.add(case.arch)
    assert seen == set(ARCHS)


def test_design_cases_are_in_the_default_grid_with_their_P():
    by_id = {c.id: c for c in cases("default", ("cpu",))}
    expected = {
        "w32-d2-b128-tanh-mse-f32-cpu": 1377,
        "w64-d2-b128-tanh-mse-f32-cpu": 4801,
        "w64-d4-b128-tanh-mse-f32-cpu": 13121,
    }
    assert {i: by_id[i].P for i in expected} == expected


def test_default_grid_spans_P_400_to_13000_on_cpu():
    sizes = [c.P for c in cases("default", ("cpu",)) if c.arch not in USER_ARCHS]
    assert 300 <= min(sizes) <= 600
    assert 12000 <= max(sizes) <= 14000


def test_default_grid_has_three_shapes_in_every_size_range():
    by_range: dict = {}
    for c in cases("default", ("cpu",)):
        if c.arch in USER_ARCHS:  # the users family's P = 49 is alone in its range
            continue
        by_range.setdefault((c.dtype, size_range(c.P)), set()).add(
            (c.width, c.depth, c.batch, c.activation, c.loss, c.output, c.arch)
        )
    assert len(by_range) >= 4
    assert all(len(shapes) >= 3 for shapes in by_range.values()), by_range


def test_default_grid_has_each_design_case_in_every_arch():
    ids = {c.id for c in cases("default", ("cpu",))}
    for base in ("w32-d2", "w64-d2", "w64-d4"):
        for arch in ("", "custom-", "layernorm-"):
            assert f"{arch}{base}-b128-tanh-mse-f32-cpu" in ids


def test_large_grid_reaches_P_30000():
    assert max(c.P for c in cases("large", ("cpu",))) >= 30000


@pytest.mark.parametrize("arch", ["custom", "layernorm"])
def test_arch_forms_share_the_sequential_weights(arch):
    seq, (x, y), _ = make_problem(_case())
    net, (x2, y2), loss_fn = make_problem(_case(arch=arch))
    linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
    assert [torch.equal(a.weight, b.weight) for a, b in zip(linears, net.fcs)] == [True] * 3
    assert torch.equal(x, x2)
    assert sum(p.numel() for p in net.parameters()) == _case(arch=arch).P
    out = net(x2)
    value = loss_fn(out, y2) if loss_fn else torch.nn.functional.mse_loss(out, y2)
    assert value.dim() == 0
    if arch == "custom":
        assert out.shape == y2.shape == (128,)
        torch.testing.assert_close(out, seq(x).squeeze(-1))


def test_custom_arch_is_the_one_output_mse_form():
    with pytest.raises(ValueError, match="arch 'custom'"):
        _case(arch="custom", output=3, loss="ce")
    with pytest.raises(ValueError, match="arch"):
        _case(arch="conv")


def test_smoke_grid_covers_every_activation_loss_dtype_and_arch():
    smoke = cases("smoke", ("cpu",))
    assert {c.arch for c in smoke} == {"mlp", "custom", "layernorm"}
    assert {c.activation for c in smoke} == {"tanh", "relu", "gelu"}
    assert {c.loss for c in smoke} == {"mse", "ce"}
    assert {c.dtype for c in smoke} == {"float32", "float64"}
    assert max(c.P for c in smoke) < 100


def test_every_grid_expands_to_unique_ids_sorted_by_P_per_device():
    for grid in GRIDS:
        expanded = cases(grid)
        assert len({c.id for c in expanded}) == len(expanded)
        for device in ("cpu", "cuda"):
            sizes = [c.P for c in expanded if c.device == device]
            assert sizes == sorted(sizes)


def test_full_grid_sweeps_batch_and_depth():
    full = cases("full", ("cpu",))
    assert {c.batch for c in full if c.width == 32 and c.depth == 2} >= {16, 64, 256, 1024}
    assert {c.depth for c in full if c.width == 64} >= {1, 2, 3, 4, 5}
    assert 15000 <= max(c.P for c in full) <= 25000
    assert max(c.P for c in cases("full", ("cuda",))) > 25000


def test_devices_filter_the_grid():
    assert {c.device for c in cases("default", ("cpu",))} == {"cpu"}
    assert {c.device for c in cases("default", ("cuda",))} == {"cuda"}
    assert {c.device for c in cases("full", ("cpu",))} == {"cpu"}


def test_expand_is_the_cross_product():
    fields = {k: v for k, v in _case().fields().items() if k != "case"}
    out = expand(**{**fields, "width": [4, 8], "activation": ["tanh", "gelu", "relu"]})
    assert len(out) == 6
    assert {(c.width, c.activation) for c in out} == {
        (w, a) for w in (4, 8) for a in ("tanh", "gelu", "relu")
    }


def test_expand_rejects_unknown_and_missing_fields():
    fields = _case().fields()
    del fields["case"]
    with pytest.raises(ValueError, match="unknown case fields"):
        expand(**fields, colour="red")
    del fields["batch"]
    with pytest.raises(ValueError, match="missing case fields"):
        expand(**fields)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(width=0), "width"),
        (dict(activation="sigmoid"), "activation"),
        (dict(dtype="float16"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(loss="ce", output=1), "output >= 2"),
    ],
)
def test_case_rejects_bad_fields(changes, message):
    with pytest.raises(ValueError, match=message):
        _case(**changes)


def test_unknown_grid_or_device_lists_the_valid_ones():
    with pytest.raises(ValueError, match="smoke"):
        cases("huge")
    with pytest.raises(ValueError, match="cpu"):
        cases("smoke", ("tpu",))


def test_case_fields_are_plain_and_id_is_readable():
    case = _case(loss="ce", output=4, dtype="float64")
    fields = case.fields()
    assert fields["case"] == "i8-o4-w32-d2-b128-tanh-ce-f64-cpu"
    assert all(isinstance(v, (str, int)) for v in fields.values())


@pytest.mark.parametrize("case", cases("smoke", ("cpu",)), ids=lambda c: c.id)
def test_model_matches_the_case_and_is_deterministic(case):
    net, (inputs, targets), loss_fn = make_problem(case)
    assert sum(p.numel() for p in net.parameters()) == case.P
    assert {p.dtype for p in net.parameters()} == {getattr(torch, case.dtype)}
    assert inputs.shape == (case.batch, case.input)
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == case.depth + 1
    loss = (loss_fn or torch.nn.functional.mse_loss)(net(inputs), targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    again, (inputs2, targets2), _ = make_problem(case)
    assert torch.equal(inputs, inputs2) and torch.equal(targets, targets2)
    for p, q in zip(net.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_case_P_is_the_number_of_chosen_parameters_in_every_grid():
    """Every case of every grid, built (on the cpu: P does not depend on the device)."""
    every = {c.id: dataclasses.replace(c, device="cpu") for g in GRIDS for c in cases(g)}
    for case in every.values():
        net, _, _ = make_problem(case)
        chosen = chosen_params(case, net)
        assert sum(p.numel() for p in chosen.values()) == case.P, case.id


def test_users_grid_has_every_user_arch_and_is_in_the_default_grid():
    users = cases("users", ("cpu",))
    assert {c.arch for c in users} == set(USER_ARCHS)
    assert {c.id for c in users} <= {c.id for c in cases("default", ("cpu",))}
    forum = [c for c in users if c.arch == "forum" and c.input == 1]
    assert [(c.P, c.batch) for c in forum] == [(49, 100)]
    assert all(c.dtype == "float32" and c.device == "cpu" for c in users)


def _tiny(arch: str, **changes) -> Case:
    fields = dict(input=2, width=4, depth=1, output=1, activation="tanh", loss="mse", batch=6)
    return Case(**{**fields, "dtype": "float64", "device": "cpu", "arch": arch, **changes})


@pytest.mark.parametrize(
    "case",
    [
        _tiny("forum"),
        _tiny("cnn", input=8, depth=2, output=3, loss="ce", activation="relu"),
        _tiny("pinn_grad", depth=2),
        _tiny("pinn_hessian", depth=2),
        _tiny("transformer", output=3, loss="ce", activation="gelu"),
        _tiny("weighted", activation="gelu", depth=2),
    ],
    ids=lambda c: c.arch,
)
def test_user_nets_make_a_finite_deterministic_loss_of_the_chosen_params(case):
    net, batch, loss_fn = make_problem(case)
    chosen = chosen_params(case, net)
    loss = loss_fn(net(batch[0]), batch[1])
    assert loss.dim() == 0 and torch.isfinite(loss)
    # a PINN's output bias leaves the Laplacian as it is: its gradient is None
    grads = torch.autograd.grad(loss, list(chosen.values()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    again, batch2, _ = make_problem(case)
    assert all(torch.equal(a, b) for a, b in zip(batch, batch2))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), again.parameters()))
    if case.arch == "cnn":  # the Linear head alone
        assert list(chosen) == ["fc.weight", "fc.bias"]
        assert sum(p.numel() for p in net.parameters()) > case.P


def test_the_two_pinns_are_one_function_written_two_ways():
    by_grad, (x, _), _ = make_problem(_tiny("pinn_grad", depth=2))
    by_hessian, (x2, _), _ = make_problem(_tiny("pinn_hessian", depth=2))
    assert torch.equal(x, x2)
    torch.testing.assert_close(by_grad(x), by_hessian(x))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(arch="forum", depth=2), "forum.*depth 1"),
        (dict(arch="cnn", input=6, depth=2, loss="ce", output=3), "cnn.*divisible"),
        (dict(arch="pinn_grad", output=2), "pinn_grad.*output 1"),
        (dict(arch="transformer", width=5, loss="ce", output=3), "transformer.*heads"),
        (dict(arch="weighted", loss="ce", output=3), "weighted.*mse"),
    ],
)
def test_user_archs_reject_fields_they_cannot_build(changes, message):
    with pytest.raises(ValueError, match=message):
        _case(**changes)
