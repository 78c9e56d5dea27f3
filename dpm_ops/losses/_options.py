"""What the loss modules share: ``backend=`` (the ops' keyword) with the deprecated ``fused=`` mapped
onto it, an nn.Module that holds a loss function's keyword options, and the batch a mining loss mines over.

``fused=`` predates the ops' ``backend=``; it is accepted for one release with a DeprecationWarning:
``fused=True`` is the default ``backend=None`` (by device), ``fused=False`` is ``backend="reference"``.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Callable, Optional

import torch.nn as nn

from .._backend import BACKENDS
from .._stack import stacklevel_outside
from ..ops._checks import check_flag


_HERE = os.path.dirname(os.path.abspath(__file__))


def backend_of_fused(fused: bool, caller: str, backend_given: bool) -> Optional[str]:
    """The ``backend`` that the deprecated ``fused`` stood for, with a DeprecationWarning; a TypeError
    when the caller also gave ``backend=`` (which one would win is no guess to make)."""
    if backend_given:
        raise TypeError(f"{caller}: pass backend= alone (fused= is its deprecated form)")
    check_flag(caller, "fused", fused)  # "no" would read as true
    warnings.warn(
        f"{caller}: fused= is deprecated and will be removed in the next release; pass "
        f"backend='reference' instead of fused=False (fused=True is the default, backend=None)",
        DeprecationWarning,
        stacklevel=stacklevel_outside(_HERE),  # the user's line, whatever __init__ chain led here
    )
    return None if fused else "reference"


def accepts_fused(function):
    """``function`` (a loss taking ``backend=``) that also takes the deprecated ``fused=``."""

    @functools.wraps(function)
    def loss(*args, fused: Optional[bool] = None, **kwargs):
        if fused is not None:
            kwargs["backend"] = backend_of_fused(fused, function.__name__, "backend" in kwargs)
        return function(*args, **kwargs)

    return loss


def same_batch(features, labels) -> tuple:
    return features, labels  # a module function: the losses pickle (torch.save of a module, other processes)


def check_batch_option(owner: str, name: str, batch) -> Callable:
    """``batch(features, labels)``: the batch a loss mines over (under DDP the whole batch from every rank's share,
    engine.distributed.gather_batch); by default (None) the features and labels given."""
    if batch is None:
        return same_batch
    if not callable(batch):
        raise ValueError(f"{owner}: {name} must be None or a callable, got {type(batch).__name__}")
    return batch


def check_backend_name(owner: str, backend) -> Optional[str]:
    """None or a backend's name: a loss module is built long before its first batch would find a typo."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


class LossModule(nn.Module):
    """The nn.Module of ``loss_function``: its keyword options given once, as attributes, and passed on
    every call. The function's signature is the one list of the options and their defaults."""

    loss_function = None  # set by each subclass (a staticmethod)
    module_options: tuple = ()  # a subclass's own keyword options, beside the function's

    def __init__(self, **options):
        super().__init__()
        if "fused" in options:
            options["backend"] = backend_of_fused(options.pop("fused"), type(self).__name__, "backend" in options)
        try:
            bound = inspect.signature(self.loss_function).bind_partial(**options)
        except TypeError as error:  # an unknown option: bind's message named neither the loss nor its options
            parameters = inspect.signature(self.loss_function).parameters.values()
            known = [p.name for p in parameters if p.default is not inspect.Parameter.empty]
            known = ", ".join([*known, *self.module_options])
            raise TypeError(f"{type(self).__name__}: {error} (its options: {known})") from None
        bound.apply_defaults()
        check_backend_name(type(self).__name__, bound.arguments.get("backend"))
        self._option_names = tuple(bound.arguments)
        for name, value in bound.arguments.items():
            setattr(self, name, value)

    @property
    def fused(self) -> bool:
        """Deprecated: whether ``backend`` is not "reference"."""
        warnings.warn(
            f"{type(self).__name__}.fused is deprecated: read .backend (None: by device)", DeprecationWarning, 2
        )
        return self.backend != "reference"

    def options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def forward(self, *inputs):
        return self.loss_function(*inputs, **self.options())

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options().items())
