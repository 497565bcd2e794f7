"""Calls of every ``nat_mm`` op, shared by the CPU tests (test_ops.py) and the CUDA tests
(test_cuda_ops.py): opcheck's samples and the double-backward checks; calls of the
public functions, shared by the tests of torch's transforms (autocast, vmap, torch.func);
and a log of the op calls that run."""
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nat_mm.ops import na2d, na2d_av, na2d_qk
from nat_mm.ops.library import op


class OpLog(TorchDispatchMode):
    """Records (op name, (batch, heads) of its first argument) of each nat_mm op call, and
    the first arguments themselves."""

    def __init__(self):
        super().__init__()
        self.calls, self.first_args = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == 'nat_mm':
            self.calls.append((func.__name__.split('.')[0], tuple(args[0].shape[:2])))
            self.first_args.append(args[0])
        return func(*args, **(kwargs or {}))


def _leaf(t):
    return t.detach().clone().requires_grad_()


def public_calls(kernel_size, dilation):
    """{name: fn(query, key, value, rpb)} for each public function (na2d_av of the softmax
    of na2d_qk)."""
    return {
        'na2d': lambda q, k, v, rpb: na2d(q, k, v, kernel_size, dilation, rpb=rpb),
        'na2d_qk': lambda q, k, v, rpb: na2d_qk(q, k, kernel_size, dilation, rpb=rpb),
        'na2d_av': lambda q, k, v, rpb: na2d_av(
            na2d_qk(q, k, kernel_size, dilation, rpb=rpb).softmax(-1), v, kernel_size,
            dilation),
    }


def opcheck_samples(q, k, v, rpb, weights, grad_out, ks, dil):
    """{op name: its arguments}; inputs that autograd could differentiate require grad,
    so opcheck also checks each op's autograd registration."""
    out, lse = op('na2d_fused')(q, k, v, rpb, ks, dil, 0.5)
    plain = [t.detach() for t in (q, k, v, rpb, out, lse)]
    grad_lse = grad_out.detach()[..., 0].float()  # lse's gradient, [B, heads, H, W]
    return {
        'na2d_qk': (q, k, rpb, ks, dil),
        'na2d_av': (weights, v, ks, dil),
        'na2d_inverse': (_leaf(weights), _leaf(q), ks, dil),
        'na2d_rpb_grad': (_leaf(weights), ks, dil),
        'na2d_fused': (q, k, v, rpb, ks, dil, 0.5),
        'na2d_fused_backward': (grad_out.detach(), *plain, ks, dil, 0.5, grad_lse),
    }


def assert_double_backward(q, k, v, rpb, weights, ks, dil):
    """gradgradcheck (create_graph=True backwards differentiated again) of every op, on
    float64 inputs that require grad; an op without an autograd kernel fails it."""
    checks = {
        'na2d': (lambda *t: na2d(*t[:3], ks, dil, rpb=t[3]), (q, k, v, rpb)),
        'na2d_qk': (lambda a, b, c: na2d_qk(a, b, ks, dil, rpb=c), (q, k, rpb)),
        'na2d_av': (lambda a, b: na2d_av(a, b, ks, dil), (weights, v)),
        'na2d_inverse': (lambda a, b: op('na2d_inverse')(a, b, ks, dil), (weights, v)),
        'na2d_rpb_grad': (lambda a: op('na2d_rpb_grad')(a, ks, dil), (weights, )),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*autograd kernel was not registered')
        for name, (fn, inputs) in checks.items():
            assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True), name
