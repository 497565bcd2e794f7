"""Raw op calls (``torch.ops.nat_mm.*``, bypassing the Python validation) with one bad
argument each: the compiled kernels of every device must raise, naming the argument, never
read out of bounds. Shared by the CPU tests and the CUDA tests."""
import torch

KS, DIL = [3, 3], [1, 1]
V, T = ValueError, TypeError


def bad_calls(device):
    """(id, op name, builder of the arguments from a [1, 2, 9, 9, 8] float32 query, regex the
    error must match, the error's type). The type is the one the Python checks raise for the
    fault (validation.py: TypeError for a dtype or argument structure, ValueError for a shape,
    value or device), and every kernel raises it. Tensors are made only when a builder runs,
    so listing the ids needs no GPU."""
    def new(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype)

    def lse():
        return torch.zeros(1, 2, 9, 9, device=device)

    f64 = torch.float64
    return [
        ('qk-key-shape', 'na2d_qk', lambda q: (q, q[..., :4], None, KS, DIL), 'key', V),
        ('qk-rank', 'na2d_qk', lambda q: (q[0], q[0], None, KS, DIL), '5-D', V),
        ('qk-map-too-small', 'na2d_qk', lambda q: (q, q, None, [5, 5], [2, 2]), 'pad', V),
        ('qk-rpb-shape', 'na2d_qk', lambda q: (q, q, new(2, 3, 3), KS, DIL), 'rpb', V),
        ('qk-rpb-dtype', 'na2d_qk', lambda q: (q, q, new(2, 5, 5, dtype=f64), KS, DIL), 'rpb',
         T),
        ('qk-even-kernel', 'na2d_qk', lambda q: (q, q, None, [4, 3], DIL), 'kernel_size', V),
        ('qk-kernel-1', 'na2d_qk', lambda q: (q, q, None, [1, 3], DIL), 'kernel_size', V),
        ('qk-kernel-entries', 'na2d_qk', lambda q: (q, q, None, [3], DIL), 'kernel_size', T),
        ('qk-dilation-0', 'na2d_qk', lambda q: (q, q, None, KS, [0, 1]), 'dilation', V),
        ('qk-dtype', 'na2d_qk', lambda q: (q, q.double(), None, KS, DIL), 'key', T),
        ('qk-integer', 'na2d_qk', lambda q: (q.int(), q.int(), None, KS, DIL), 'query', T),
        ('av-window', 'na2d_av', lambda q: (new(1, 2, 9, 9, 8), q, KS, DIL), 'attn', V),
        ('av-map', 'na2d_av', lambda q: (new(1, 2, 9, 8, 9), q, KS, DIL), 'attn', V),
        ('av-dtype', 'na2d_av', lambda q: (new(1, 2, 9, 9, 9, dtype=f64), q, KS, DIL), 'attn',
         T),
        ('inverse-window', 'na2d_inverse', lambda q: (new(1, 2, 9, 9, 7), q, KS, DIL),
         'weights', V),
        ('rpb-grad-window', 'na2d_rpb_grad', lambda q: (new(1, 2, 9, 9, 7), KS, DIL),
         'grad_attn', V),
        ('fused-value-shape', 'na2d_fused', lambda q: (q, q, q[:, :1], None, KS, DIL, 1.0),
         'value', V),
        ('fused-bwd-lse-shape', 'na2d_fused_backward',
         lambda q: (q, q, q, q, None, q, torch.zeros(1, 2, 9, 8, device=device), KS, DIL, 1.0),
         'lse', V),
        ('fused-bwd-out-shape', 'na2d_fused_backward',
         lambda q: (q, q, q, q, None, q[..., :4], lse(), KS, DIL, 1.0), 'out', V),
        ('fused-bwd-grad-dtype', 'na2d_fused_backward',
         lambda q: (q.double(), q, q, q, None, q, lse(), KS, DIL, 1.0), 'grad_out', T),
        ('fused-bwd-grad-lse-shape', 'na2d_fused_backward',
         lambda q: (q, q, q, q, None, q, lse(), KS, DIL, 1.0, lse()[..., :8]), 'grad_lse', V),
    ]

IDS = [call[0] for call in bad_calls('cpu')]
