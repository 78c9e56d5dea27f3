"""torch.library registrations shared by the ops whose backward is an op of its own."""

import torch


def register_forward_backward(
    forward_op, backward_op, *, fake_forward, fake_backward, make_backward, setup_context
) -> None:
    """Fake (meta) functions for both ops, and the forward's autograd: ``make_backward(backward_op)``
    is the autograd backward, fed by ``setup_context``."""
    torch.library.register_fake(forward_op)(fake_forward)
    torch.library.register_fake(backward_op)(fake_backward)
    torch.library.register_autograd(forward_op, make_backward(backward_op), setup_context=setup_context)
