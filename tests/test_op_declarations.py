"""Every op declared in dpm_ops/ops (through ops/_declare.py) is defined with its schema, has a fake
and, where declared, an autograd formula for its C++ op and its Triton twin, passes
torch.library.opcheck on small inputs, and its reference (backend="reference") matches the default
backend; the masked cosine ops also compile with torch.compile(fullgraph=True)."""

import pytest
import torch
import torch._library.simple_registry

from conftest import backend_params, device_for, op_for
from dpm_ops import _backend
from dpm_ops.ops import (
    batch_hard_triplet,
    hem_loss,
    hierarchical_mask_pool,
    knn,
    knn_certified,
    masked_arcface_ce,
    masked_cosine,
    masked_cosine_reference,
    maskreid_ranking_loss,
    self_knn,
)
from dpm_ops.ops._declare import DECLARED, twin_name

DECLARED_NAMES = list(DECLARED)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels():
    return torch.tensor([0, 0, 1, 1, 2])


def _pool_features():
    return [_randn(2, 3, 4, 3, seed=1), _randn(2, 2, 2, 5, seed=2)]


def _neighbours(n=12, width=6):
    dist = torch.cdist(_randn(n, 3, seed=3), _randn(n, 3, seed=3))
    dist.fill_diagonal_(-1)
    return torch.sort(dist, dim=1, stable=True).indices[:, :width].contiguous()


def _csr():
    row_ptr, cols = DECLARED["kreciprocal_expand"].run(_backend.resolve(None, torch.device("cpu")), _neighbours(), 4, 2)
    return row_ptr, cols, torch.rand(len(cols), generator=torch.Generator().manual_seed(4))


def _gnn_csr():
    """A propagated adjacency: a CSR with 5 to 8 weighted entries per row over 12 items."""
    row_ptr, cols = DECLARED["kreciprocal_expand"].run(_backend.resolve(None, torch.device("cpu")), _neighbours(), 4, 2)
    return row_ptr, cols, torch.rand(len(cols), generator=torch.Generator().manual_seed(6)) + 0.1


def _pair_sqdist_args():
    x = _randn(12, 5, seed=5).float()
    values, indices, _, _ = self_knn(x, 5, "sqeuclidean")
    return (x, values, indices, *_csr()[:2])


def _candidates_args():
    rows = knn_certified.Operand.of(_randn(9, 6, seed=9), "euclidean", torch.float64)
    return (*knn_certified.stage1_args(rows, rows), 3, 5, "euclidean", True)


def _candidate_distances_args():
    rows = knn_certified.Operand.of(_randn(9, 6, seed=10), "sqeuclidean", torch.float64)
    candidates = torch.tensor([[0, 3, 9, 9], [1, 2, 5, 8]])
    return (
        rows.rows,
        rows.rows,
        rows.norms,
        rows.norms,
        torch.tensor([4, 1]),
        candidates,
        torch.tensor([2, 4]),
        "sqeuclidean",
        True,
    )


def _match_ranks_args():
    pids, cams = torch.randint(0, 4, (20,), generator=torch.Generator().manual_seed(6)), torch.arange(20) % 3
    return torch.rand(6, 14, generator=torch.Generator().manual_seed(7)), pids[:6], pids[6:], cams[:6], cams[6:]


ARCFACE_OPTIONS = (30.0, 0.5, False, 1e-7, 0.5, 0.5)  # scale, margin, easy_margin, clamp_eps, plain and masked weight

# Small arguments of every declared op (CPU, float64), in its schema's order.
SAMPLES = {
    "batch_hard_triplet": lambda: (_randn(5, 4), _labels(), True),
    "hem_loss": lambda: (_randn(2, 3, 7), 1e-6, "sum"),
    "hem_loss_backward": lambda: (torch.tensor(0.5, dtype=torch.float64), _randn(2, 3, 7), 1e-6, "mean"),
    "hierarchical_mask_pool": lambda: (_pool_features(), _randn(2, 1, 8, 10).sigmoid(), "avg"),
    "hierarchical_mask_pool_backward": lambda: (
        _randn(2, 5),
        _pool_features(),
        None,
        hierarchical_mask_pool(_pool_features(), None, "max"),
        "max",
    ),
    "kreciprocal_expand": lambda: (_neighbours(), 4, 2),
    "kreciprocal_pair_sqdist": _pair_sqdist_args,
    "kreciprocal_query_expansion": lambda: (*_csr(), _neighbours()[:, :3].contiguous()),
    "kreciprocal_jaccard_blend_": lambda: (torch.rand(4, 8, generator=torch.Generator().manual_seed(8)), *_csr(), 0.3),
    "match_ranks": _match_ranks_args,
    "roc_counts": _match_ranks_args,
    "gnn_propagate": lambda: (*_gnn_csr(), _neighbours()[:, :3].contiguous(), _randn(12, 3, seed=7).float().abs()),
    "gnn_similarity_": lambda: (torch.rand(4, 8, generator=torch.Generator().manual_seed(8)), *_gnn_csr(), 0.3),
    "knn": lambda: (_randn(4, 6), _randn(7, 6, seed=1), 3, "euclidean"),
    "self_knn": lambda: (_randn(7, 6), 3, "sqeuclidean", True, 2),
    "knn_certified": lambda: (_randn(4, 6), _randn(7, 6, seed=1), 3, "cosine"),
    "self_knn_certified": lambda: (_randn(7, 6), 3, "euclidean", False, 2),
    "knn_certified_bounds": lambda: (_randn(4, 6), _randn(7, 6, seed=1), "sqeuclidean"),
    "knn_certified_candidates": _candidates_args,
    "knn_certified_candidate_distances": _candidate_distances_args,
    "masked_cosine": lambda: (_randn(5, 12), _randn(5, 12, seed=1).sigmoid(), _randn(7, 12, seed=2), 1e-12),
    "masked_cosine_train": lambda: (_randn(5, 12), _randn(5, 12, seed=1).sigmoid(), _randn(7, 12, seed=2), 1e-12),
    "masked_cosine_backward": lambda: (
        _randn(5, 7),
        _randn(5, 12),
        _randn(5, 12, seed=1).sigmoid(),
        _randn(7, 12, seed=2),
        masked_cosine(_randn(5, 12), _randn(5, 12, seed=1).sigmoid(), _randn(7, 12, seed=2)),
        None,
        1e-12,
    ),
    "masked_arcface_ce": lambda: (
        _randn(5, 6),
        _randn(5, 6, seed=1).sigmoid(),
        _randn(4, 6, seed=2),
        torch.tensor([0, 1, 3, 2, 1]),
        *ARCFACE_OPTIONS,
        True,
    ),
    "maskreid_ranking_loss": lambda: (
        torch.nn.functional.normalize(_randn(5, 4)),
        _labels(),
        0.15,
        2.0,
        "literal",
        "hardest",
    ),
    "maskreid_ranking_loss_backward": lambda: (torch.tensor(0.5, dtype=torch.float64), _randn(5, 4), _randn(5, 5)),
}


def _run(name):
    """The declared op on its samples, by backend name (a fresh copy of what it writes in place)."""

    def run(backend):
        args = SAMPLES[name]()
        result = DECLARED[name].run(_backend.resolve(backend, torch.device("cpu")), *args)
        return args[0] if result is None else result

    return run


# The public function of every op with a reference (the evaluation stages' ops have none but the op
# itself): backend="reference" against the default backend.
PUBLIC_CALLS = {
    **{name: _run(name) for name in DECLARED if name.startswith(("kreciprocal", "match_ranks", "roc", "gnn"))},
    "batch_hard_triplet": lambda backend: batch_hard_triplet(*SAMPLES["batch_hard_triplet"]()[:2], backend=backend),
    "hem_loss": lambda backend: hem_loss(_randn(2, 3, 7), backend=backend),
    "hierarchical_mask_pool": lambda backend: hierarchical_mask_pool(
        *SAMPLES["hierarchical_mask_pool"]()[:2], mode="max", backend=backend
    ),
    "knn": lambda backend: knn(*SAMPLES["knn"]()[:3], backend=backend, strategy="direct"),
    "self_knn": lambda backend: self_knn(*SAMPLES["self_knn"](), backend=backend, strategy="direct"),
    "masked_cosine": lambda backend: masked_cosine(*SAMPLES["masked_cosine"](), backend=backend),
    "masked_arcface_ce": lambda backend: masked_arcface_ce(*SAMPLES["masked_arcface_ce"]()[:4], backend=backend),
    "maskreid_ranking_loss": lambda backend: maskreid_ranking_loss(
        *SAMPLES["maskreid_ranking_loss"]()[:2], backend=backend
    ),
}


def _kinds(name):
    """(kind, qualified name) of the op and, where declared, its Triton twin."""
    kinds = [("cpp", f"dpm_ops::{name}")]
    if DECLARED[name].triton is not None:
        kinds.append(("triton", f"dpm_ops::{twin_name(name)}"))
    return kinds


def test_every_declared_op_has_samples_and_every_reference_a_call():
    assert set(SAMPLES) == set(DECLARED)
    assert set(PUBLIC_CALLS) == {name for name, op in DECLARED.items() if op.reference is not None}


def test_ops_without_a_reference_or_a_twin_say_so():
    # A backward op is differentiated through its forward's reference; an op without a Triton kernel
    # has no twin to run: both are ValueErrors naming the op, not a call of None.
    without_reference = [op for op in DECLARED.values() if op.reference is None]
    without_twin = [op for op in DECLARED.values() if op.triton is None]
    assert without_reference and without_twin
    for op in without_reference:
        with pytest.raises(ValueError, match=rf"^{op.name} has no reference of its own$"):
            op.run("reference")
    for op in without_twin:
        with pytest.raises(ValueError, match=rf"^{op.name} has no Triton kernel$"):
            op.run("triton")


@pytest.mark.parametrize("name", DECLARED_NAMES)
def test_schema_defined_once_for_the_op_and_its_twin(name):
    declared = str(torch._C.parse_schema(f"dpm_ops::{name}{DECLARED[name].schema}"))
    assert str(getattr(torch.ops.dpm_ops, name).default._schema) == declared
    if DECLARED[name].triton is not None:
        twin = getattr(torch.ops.dpm_ops, twin_name(name)).default._schema
        assert str(twin).replace(twin_name(name), name) == declared


@pytest.mark.parametrize("name", DECLARED_NAMES)
def test_fake_and_autograd_registered(name):
    for _, qualname in _kinds(name):
        assert torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None, qualname
        has_autograd = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")
        assert has_autograd == (DECLARED[name].autograd is not None), qualname


@pytest.mark.parametrize("kind", backend_params("cpp", "triton"))
@pytest.mark.parametrize("name", DECLARED_NAMES)
def test_opcheck_every_declared_op(name, kind):
    op = DECLARED[name]
    if kind == "triton" and op.triton is None:
        pytest.skip(f"{name} has no Triton twin")
    args = SAMPLES[name]()
    if op.autograd is not None:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    # The ragged-output ops (data-dependent sizes) have no autograd to check and no static output size.
    utils = ("test_schema", "test_faketensor") if name.startswith(("kreciprocal", "match", "roc", "gnn")) else None
    torch.library.opcheck(op.kernel(kind), args, **({"test_utils": utils} if utils else {}))


@pytest.mark.parametrize("kind", backend_params("cpp", "triton"))
@pytest.mark.parametrize("name", [name for name, op in DECLARED.items() if op.autograd is not None])
def test_second_derivatives_raise_instead_of_being_wrong(name, kind):
    # The backward kernels have no autograd: differentiating a gradient again must raise, not give
    # zeros or None (it did); first derivatives under create_graph stay the plain ones.
    op = DECLARED[name]
    if kind == "triton" and op.triton is None:
        pytest.skip(f"{name} has no Triton twin")
    args = SAMPLES[name]()
    inputs = [
        t.requires_grad_()
        for a in args
        for t in (a if isinstance(a, list) else [a])
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]

    def first_derivatives(create_graph):
        outputs = op.kernel(kind)(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        total = sum(o.sum() for o in outputs if o.requires_grad)
        return torch.autograd.grad(total, inputs, create_graph=create_graph, allow_unused=True)

    grads = first_derivatives(create_graph=True)
    for grad, plain in zip(grads, first_derivatives(create_graph=False)):
        assert (grad is None) == (plain is None) and (grad is None or torch.equal(grad, plain))
    again = sum((g * g).sum() for g in grads if g is not None)
    with pytest.raises(RuntimeError, match=f"dpm_ops.{name}: the fused kernels compute first derivatives only"):
        torch.autograd.grad(again, inputs, allow_unused=True)


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLS))
def test_reference_matches_the_default_backend(name):
    torch.testing.assert_close(PUBLIC_CALLS[name]("reference"), PUBLIC_CALLS[name](None))


def _inputs(device, dtype=torch.float64, requires_grad=True):
    gen = torch.Generator().manual_seed(3)
    shapes = ((5, 12), (5, 12), (7, 12))
    ts = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    ts[1] = ts[1].sigmoid()
    return [t.to(device).requires_grad_(requires_grad) for t in ts]


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
def test_opcheck(backend):
    x, mask, protos = _inputs(device_for(backend))
    torch.library.opcheck(op_for("masked_cosine", backend), (x, mask, protos, 1e-12))


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_opcheck_train_op(backend):
    x, mask, protos = _inputs(device_for(backend))
    torch.library.opcheck(op_for("masked_cosine_train", backend), (x, mask, protos, 1e-12))


@pytest.mark.parametrize("keep_den", [False, True], ids=["den-recomputed", "den-kept"])
@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_opcheck_backward_op(backend, keep_den):
    x, mask, protos = _inputs(device_for(backend), requires_grad=False)
    out, den_sq = op_for("masked_cosine_train", backend)(x, mask, protos, 1e-12)
    args = (torch.randn_like(out), x, mask, protos, out, den_sq if keep_den else None, 1e-12)
    torch.library.opcheck(op_for("masked_cosine_backward", backend), args)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_both_backward_paths_agree(backend):
    """The training variant's kept den^2 gives the gradients of the recomputing backward, bit for bit."""
    x, mask, protos = _inputs(device_for(backend))
    grad = torch.randn(x.shape[0], protos.shape[0], dtype=x.dtype, device=x.device)
    recomputed = torch.autograd.grad(op_for("masked_cosine", backend)(x, mask, protos, 1e-12), (x, mask, protos), grad)
    kept = torch.autograd.grad(
        op_for("masked_cosine_train", backend)(x, mask, protos, 1e-12)[0], (x, mask, protos), grad
    )
    for a, b in zip(recomputed, kept):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, mask, protos = _inputs(device_for(backend))

    def loss(x, mask, protos):
        return (masked_cosine(x * 2, mask, protos, backend=backend) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(x, mask, protos)
    grads = torch.autograd.grad(value, (x, mask, protos))
    expected = (masked_cosine_reference(x * 2, mask, protos) ** 2).sum()
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, mask, protos))):
        torch.testing.assert_close(got, want)


# Public functions with float arguments (eps, scale, margin, ...), which become symbolic under dynamic=True.
DYNAMIC_CALLS = {
    "batch_hard_triplet": (batch_hard_triplet, 2),
    "hem_loss": (hem_loss, 1),
    "masked_cosine": (masked_cosine, 3),
    "masked_arcface_ce": (masked_arcface_ce, 4),
    "maskreid_ranking_loss": (maskreid_ranking_loss, 2),
}


@pytest.mark.parametrize("name", sorted(DYNAMIC_CALLS))
def test_torch_compile_dynamic_shapes(name):
    # The argument checks compare numbers symbolically (math.isfinite took no SymFloat: dynamic=True failed).
    torch._dynamo.reset()
    function, count = DYNAMIC_CALLS[name]
    args = SAMPLES[name]()[:count]
    compiled = torch.compile(function, fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), function(*args))


def _strided(value):
    """`value` with the same entries in another memory layout: channels_last maps, transposed matrices."""
    if isinstance(value, list):
        return [_strided(v) for v in value]
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
        if value.dim() == 4:
            return value.contiguous(memory_format=torch.channels_last)
        return value.transpose(0, -1).contiguous().transpose(0, -1)
    return value


GRADIENT_OPS = [
    "batch_hard_triplet",
    "hem_loss_backward",
    "hierarchical_mask_pool_backward",
    "masked_arcface_ce",
    "masked_cosine_backward",
    "maskreid_ranking_loss_backward",
]


@pytest.mark.parametrize("kind", backend_params("cpp", "triton"))
@pytest.mark.parametrize("name", GRADIENT_OPS)
def test_fake_gradients_have_the_kernels_layout(name, kind):
    # The kernels return contiguous gradients; the fakes returned empty_like (channels_last for a
    # channels_last map), so torch.compile of DPM training failed its stride assertion.
    torch.library.opcheck(
        DECLARED[name].kernel(kind), tuple(_strided(a) for a in SAMPLES[name]()), test_utils=("test_faketensor",)
    )


def _one_input_calls() -> dict:
    """name -> (call(t, backend) of the op on one differentiable input t, the other arguments fixed; t)."""
    cosine, triplet, ranking = (
        SAMPLES["masked_cosine"](),
        SAMPLES["batch_hard_triplet"](),
        SAMPLES["maskreid_ranking_loss"](),
    )
    arcface, (pooled, pool_mask), (x, y, k) = (
        SAMPLES["masked_arcface_ce"](),
        SAMPLES["hierarchical_mask_pool"]()[:2],
        SAMPLES["knn"]()[:3],
    )
    return {
        "hem_loss": (lambda t, backend: hem_loss(t, backend=backend), _randn(2, 3, 7)),
        "masked_cosine": (lambda t, backend: masked_cosine(t, *cosine[1:], backend=backend), cosine[0]),
        "batch_hard_triplet": (lambda t, backend: batch_hard_triplet(t, triplet[1], backend=backend), triplet[0]),
        "maskreid_ranking_loss": (lambda t, backend: maskreid_ranking_loss(t, ranking[1], backend=backend), ranking[0]),
        "hierarchical_mask_pool": (
            lambda t, backend: hierarchical_mask_pool([t, pooled[1]], pool_mask, backend=backend),
            pooled[0],
        ),
        "masked_arcface_ce": (lambda t, backend: masked_arcface_ce(t, *arcface[1:4], backend=backend), arcface[0]),
        "knn": (lambda t, backend: knn(t, y, k, backend=backend, strategy="direct")[0], x),
    }


ONE_INPUT_CALLS = _one_input_calls()


@pytest.mark.parametrize("name", sorted(ONE_INPUT_CALLS))
def test_the_reference_backend_compiles_with_fullgraph(name):
    """Its autocast guard was a dispatch-key guard Dynamo cannot trace: fullgraph failed on backend="reference"
    (also the default where the extension is missing)."""
    call, primal = ONE_INPUT_CALLS[name]
    compiled = torch.compile(lambda t: call(t, "reference"), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(primal), call(primal, "reference"))


def test_the_compiled_reference_runs_in_the_compute_dtype_under_autocast():
    x, mask, protos = (t.float() for t in SAMPLES["masked_cosine"]()[:3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = masked_cosine(x, mask, protos, backend="reference")
        compiled = torch.compile(lambda a: masked_cosine(a, mask, protos, backend="reference"), fullgraph=True)(x)
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("name", sorted(set(ONE_INPUT_CALLS) - {"knn"}))
def test_forward_mode_through_a_kernel_raises_and_the_reference_has_it(name):
    """A custom op's autograd is reverse mode only: torch.func.jvp through a kernel gave a zero tangent."""
    call, primal = ONE_INPUT_CALLS[name]
    tangent = torch.randn(primal.shape, generator=torch.Generator().manual_seed(1), dtype=primal.dtype)
    with pytest.raises(RuntimeError, match=rf"^dpm_ops.{name}: the fused kernels have no forward-mode derivative"):
        torch.func.jvp(lambda t: call(t, None), (primal,), (tangent,))
    # the reference's tangent is the directional derivative: the kernel's gradient dotted with the tangent
    _, forward = torch.func.jvp(lambda t: call(t, "reference").sum(), (primal,), (tangent,))
    leaf = primal.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(call(leaf, None).sum(), leaf)
    torch.testing.assert_close(forward, (gradient * tangent).sum())


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
@pytest.mark.parametrize("name", sorted(ONE_INPUT_CALLS))
def test_torch_func_grad_through_a_kernel_raises_naming_the_op(name, backend):
    """torch's autograd of a custom op does not run under torch.func.grad: its RuntimeError asked for an
    autograd.Function's setup_context, naming neither the op nor a way out. The reference differentiates there."""
    call, primal = ONE_INPUT_CALLS[name]
    with pytest.raises(RuntimeError, match=rf"^dpm_ops.{name}(_train)?: the fused kernels' gradients do not run under"):
        torch.func.grad(lambda t: call(t, backend).sum())(primal)
    leaf = primal.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(call(leaf, backend).sum(), leaf)
    torch.testing.assert_close(torch.func.grad(lambda t: call(t, "reference").sum())(primal), gradient)


@pytest.mark.parametrize("backend", ["reference", None])
def test_vmap_over_the_ops_equals_a_loop(backend):
    """The value checks' .tolist() was an internal error under torch.func.vmap (batched tensors have no storage):
    they are skipped there, as while compiling."""
    stack = _randn(3, 2, 3, 7)
    torch.testing.assert_close(
        torch.func.vmap(lambda t: hem_loss(t, backend=backend))(stack),
        torch.stack([hem_loss(t, backend=backend) for t in stack]),
    )
    features, labels = SAMPLES["batch_hard_triplet"]()[:2]
    batch = torch.stack([features, features.flip(0), 2 * features])
    torch.testing.assert_close(
        torch.func.vmap(lambda t: batch_hard_triplet(t, labels, backend=backend))(batch),
        torch.stack([batch_hard_triplet(t, labels, backend=backend) for t in batch]),
    )


@pytest.mark.parametrize("backend", backend_params("cpp", "triton"))
@pytest.mark.parametrize("name", ["batch_hard_triplet", "masked_arcface_ce"])
def test_backward_through_a_vmap_of_a_fused_loss(name, backend):
    """The fused losses compute their gradients in the forward when autograd may ask for them: a batched tensor's
    requires_grad is False under vmap, so a backward through it raised ("called with with_grad=False")."""
    call, primal = ONE_INPUT_CALLS[name]
    batch = torch.stack([primal, 2 * primal])
    leaf, reference_leaf = batch.clone().requires_grad_(), batch.clone().requires_grad_()
    (got,) = torch.autograd.grad(torch.vmap(lambda t: call(t, backend))(leaf).sum(), leaf)
    (want,) = torch.autograd.grad(sum(call(t, "reference") for t in reference_leaf), reference_leaf)
    torch.testing.assert_close(got, want)


def _thread_count_calls():
    """name -> call(t) of the C++ op on one differentiable float32 input t (300, 257): sizes that split the
    kernels' OpenMP loops into several chunks."""
    gen = torch.Generator().manual_seed(11)
    mask, protos = torch.rand(300, 257, generator=gen), torch.randn(701, 257, generator=gen)
    labels = torch.arange(300) % 75
    pool_mask = torch.rand(12, 1, 514, 2, generator=gen)
    return {
        "masked_cosine": lambda t: masked_cosine(t, mask, protos, backend="cpp"),
        "masked_arcface_ce": lambda t: masked_arcface_ce(t, mask, protos, labels, backend="cpp"),
        "batch_hard_triplet": lambda t: batch_hard_triplet(t, labels, backend="cpp"),
        "maskreid_ranking_loss": lambda t: maskreid_ranking_loss(
            t / t.norm(dim=1, keepdim=True), labels, backend="cpp"
        ),
        "hem_loss": lambda t: hem_loss(t.view(60, 5, 257), backend="cpp"),
        "hierarchical_mask_pool": lambda t: hierarchical_mask_pool([t.view(12, 25, 257, 1)], pool_mask, backend="cpp"),
    }


@pytest.mark.skipif(not _backend.backends()["cpp"][0], reason="needs the C++ extension")
@pytest.mark.parametrize("name", sorted(_thread_count_calls()))
def test_cpu_kernels_give_the_same_bits_for_any_thread_count(name):
    """The C++ kernels sum in fixed orders (no atomics): values and gradients do not depend on the thread count."""
    call, previous = _thread_count_calls()[name], torch.get_num_threads()
    primal = torch.randn(300, 257, generator=torch.Generator().manual_seed(12))
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            leaf = primal.clone().requires_grad_()
            out = call(leaf)
            results.append((out.detach(), *torch.autograd.grad(out.sum(), leaf)))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))
