"""Every op of dpm_ops is declared once, with declare(): its schema, fake (meta) function, autograd
formula, the implementation of its Triton twin, and its reference. From that declaration this
module generates

* the definition of ``dpm_ops::<name>`` (the C++ kernels only register into it, per device, in
  csrc/<op>/<op>_{cpu,cuda}.cpp) and, when the op has a Triton implementation, of its twin
  ``dpm_ops::<name>_triton`` (``<op>_triton_backward`` for ``<op>_backward``) with the same schema,
  which checks its arguments as the C++ op does (its declared `check`: a direct torch.ops call of
  either gets the same ValueErrors);
* the fake and autograd registrations of both (the autograd formula takes the backward op of its
  own kind: the C++ forward differentiates through the C++ backward, the twin through the twin's);
* the dispatch of a resolved backend name: Op.run(name, ...) runs the reference, the C++ op or the
  Triton twin.

The definitions do not depend on the compiled extension: without it the C++ ops exist and have no
kernel, and _backend.resolve never picks them. With it, its kernels (TORCH_LIBRARY_IMPL) are
registered first, when _backend loads it, and the dispatcher attaches them to the schemas defined here.
"""

import dataclasses
import functools
import importlib
from typing import Callable, Optional, Union

import torch

from .. import _backend  # noqa: F401  (loads the extension: its kernels register before the schemas are defined)
from .._precision import without_autocast
from ._checks import functorch_transforms

LIBRARY = torch.library.Library("dpm_ops", "FRAGMENT")
DECLARED: dict = {}  # name -> Op, in declaration order (what tests/test_op_declarations.py walks)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    schema: str  # "(arguments) -> returns", shared by the C++ op and its Triton twin
    fake: Callable
    triton: Optional[Callable]  # the twin's implementation, or None: no twin
    check: Optional[Callable]  # the twin's argument checks (the C++ op's are in C++), on the op's arguments
    backward: Optional["Op"]
    reference: Optional[Callable]  # what backend "reference" runs, on the public function's arguments
    autograd: Optional[Callable]
    setup_context: Optional[Callable]

    def kernel(self, backend: str):
        """The op that runs `backend`: the Triton twin for "triton", else the C++ op ("cpp", "cuda")."""
        if backend != "triton":
            return getattr(torch.ops.dpm_ops, self.name).default
        if self.triton is None:
            raise ValueError(f"{self.name} has no Triton kernel")
        return getattr(torch.ops.dpm_ops, twin_name(self.name)).default

    def run(self, backend: str, *args):
        """The op of the resolved `backend` (a name of _backend.resolve) on `args`."""
        if backend != "reference":
            _refuse_forward_mode(self.name, args)
            if self.autograd is not None:
                _refuse_functorch_grad(self.name, args)
            return self.kernel(backend)(*args)
        if self.reference is None:  # a backward or variant op: its forward's reference is differentiated
            raise ValueError(f"{self.name} has no reference of its own")
        return without_autocast(self.reference)(*args)  # in the compute dtype under autocast, as the kernels


def _refuse_forward_mode(name: str, args) -> None:
    """A RuntimeError for inputs that carry forward-mode tangents (torch.func.jvp, torch.autograd.forward_ad): a
    custom op's autograd (register_autograd) is reverse mode only, and the kernels' results came out with zero or
    no tangents, silently. The reference is plain torch and has them."""
    if torch.autograd.forward_ad._current_level < 0:  # no dual level open: nothing to look at
        return
    if any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in _tensors(args)):
        raise RuntimeError(
            f"dpm_ops.{name}: the fused kernels have no forward-mode derivative (torch.func.jvp, "
            "torch.autograd.forward_ad); use backend='reference'"
        )


def _refuse_functorch_grad(name: str, args) -> None:
    """A RuntimeError naming the op for inputs that need grad under torch.func.grad (vjp, jacrev, hessian):
    torch's autograd of a custom op (register_autograd) does not run under its grad transform, whose error
    ("an autograd.Function ... must override the setup_context staticmethod") named neither the op nor a way out.
    Not looked at while compiling: Dynamo cannot trace the transforms' stack."""
    if torch.compiler.is_compiling() or torch._C._functorch.TransformType.Grad not in functorch_transforms():
        return
    if torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args)):
        raise RuntimeError(
            f"dpm_ops.{name}: the fused kernels' gradients do not run under torch.func.grad (vjp, jacrev); "
            "use backend='reference', or torch.autograd.grad"
        )


def gradient_wanted(*tensors: torch.Tensor) -> bool:
    """Whether autograd may ask for the gradients of `tensors` (the fused losses compute them in their forward only
    then): grad mode on and one of them requiring grad, or under torch.func.vmap, whose batched tensors never say
    they do while the tensors mapped over may (a backward through the vmap raised: "called with with_grad=False")."""
    if not torch.is_grad_enabled():
        return False
    if any(t.requires_grad for t in tensors):
        return True
    return not torch.compiler.is_compiling() and torch._C._functorch.TransformType.Vmap in functorch_transforms()


def twin_name(name: str) -> str:
    """The Triton twin of ``<op>`` is ``<op>_triton``, of ``<op>_backward`` ``<op>_triton_backward``."""
    stem, backward, _ = name.partition("_backward")
    return f"{stem}_triton{backward}"


def lazy(path: str) -> Callable:
    """The function ``module:function`` of dpm_ops (e.g. "triton.knn:knn_forward"), imported at its
    first call: Triton loads only when a Triton kernel runs."""
    module, function = path.split(":")

    def call(*args):
        return getattr(importlib.import_module(f"dpm_ops.{module}"), function)(*args)

    return call


def _define(name: str, schema: str, implementation: Optional[Callable], check: Optional[Callable]) -> None:
    LIBRARY.define(name + schema)
    if implementation is not None:
        # A Python kernel may be called without the trailing arguments left at their defaults.
        defaults = [argument.default_value for argument in torch._C.parse_schema(name + schema).arguments]

        @without_autocast
        def kernel(*args):
            args = (*args, *defaults[len(args) :])
            if check is not None:
                check(*args)
            return implementation(*args)

        LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")


class _SecondDerivativeError(torch.autograd.Function):
    """Passes the first `count` tensors through; differentiating them raises, naming the op. Its other
    inputs (what the gradients depend on) connect it to every path a second derivative takes."""

    @staticmethod
    def forward(ctx, name, count, *tensors):
        ctx.name = name
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"dpm_ops.{ctx.name}: the fused kernels compute first derivatives only; "
            "for higher-order gradients use backend='reference'"
        )


def _tensors(values) -> list:
    """The tensors among `values`, list arguments (Tensor[]) flattened."""
    found = []
    for value in values:
        if isinstance(value, (list, tuple)):
            found += _tensors(value)
        elif isinstance(value, torch.Tensor):
            found.append(value)
    return found


def first_derivatives_only(name: str, setup_context: Optional[Callable], formula: Callable) -> tuple:
    """(setup_context, backward) for register_autograd: `formula` run without grad, since the fused
    backward kernels have no autograd of their own and differentiating their results again gave silently
    wrong (zero or missing) second derivatives. Under create_graph, the gradients instead come through
    _SecondDerivativeError, connected to the op's inputs that need grad (kept by the setup: some
    formulas save only a gradient computed in the forward), which raises when they are differentiated."""

    def setup(ctx, inputs, output):
        ctx.inputs_needing_grad = [t for t in _tensors(inputs) if t.requires_grad]
        if setup_context is not None:
            setup_context(ctx, inputs, output)

    @functools.wraps(formula)
    def backward(ctx, *grads):
        with torch.no_grad():
            results = formula(ctx, *grads)
        sources = [*ctx.inputs_needing_grad, *(g for g in _tensors(grads) if g.requires_grad)]
        single = not isinstance(results, tuple)
        results = (results,) if single else results
        gradients = _tensors(results)
        if not (torch.is_grad_enabled() and sources and gradients):
            return results[0] if single else results
        marked = iter(_SecondDerivativeError.apply(name, len(gradients), *gradients, *sources))
        # the same structure (a list for a Tensor[] argument), each tensor replaced by its marked view
        results = tuple(
            [next(marked) if isinstance(t, torch.Tensor) else t for t in r]
            if isinstance(r, (list, tuple))
            else next(marked)
            if isinstance(r, torch.Tensor)
            else r
            for r in results
        )
        return results[0] if single else results

    return setup, backward


def register_fake_and_autograd(op: Op, qualname: str, backward_op, library: torch.library.Library) -> None:
    """Registers `op`'s fake function and, if it has one, its autograd formula (differentiating through
    `backward_op`, first derivatives only) for the defined op `qualname` ("namespace::name")."""
    torch.library.register_fake(qualname, op.fake, lib=library)
    if op.autograd is not None:
        setup, formula = first_derivatives_only(op.name, op.setup_context, functools.partial(op.autograd, backward_op))
        torch.library.register_autograd(qualname, formula, setup_context=setup, lib=library)


def declare(
    name: str,
    schema: str,
    fake: Callable,
    *,
    triton: Union[str, Callable, None] = None,
    check: Optional[Callable] = None,
    reference: Optional[Callable] = None,
    backward: Optional[Op] = None,
    setup_context: Optional[Callable] = None,
    autograd: Optional[Callable] = None,
) -> Op:
    """Defines ``dpm_ops::<name><schema>`` and, with `triton` (a callable or a lazy() path), its twin
    ``dpm_ops::<name>_triton``, which runs ``check`` on its arguments first (what the C++ op checks in C++:
    shapes, dtypes, devices, options, a label range); registers `fake` for both and, with `autograd`, their autograd:
    ``autograd(backward_op, ctx, *grads)`` fed by ``setup_context``, where backward_op is the
    declared `backward` op of the same kind (C++ or twin), or None."""
    if isinstance(triton, str):
        triton = lazy(triton)
    if (triton is None) != (check is None):
        raise TypeError(f"declare({name!r}): a Triton twin and its argument check come together")
    op = Op(name, schema, fake, triton, check, backward, reference, autograd, setup_context)
    kinds = [("cpp", name, None)] + ([("triton", twin_name(name), triton)] if triton is not None else [])
    for kind, qualname, implementation in kinds:
        _define(qualname, schema, implementation, check)
        backward_op = backward.kernel(kind) if backward is not None else None
        register_fake_and_autograd(op, f"dpm_ops::{qualname}", backward_op, LIBRARY)
    DECLARED[name] = op
    return op
