"""Determinism (issue 7).

* With ``torch.use_deterministic_algorithms(True)``, two training steps of a NAT / DiNAT
  backbone, repeated from the same seed, give bitwise-identical losses and gradients --
  every parameter, the relative position biases (rpb) included.
* Operator level: the gradients of na2d_qk (query, key, rpb), na2d_av (attn, value) and
  the fused na2d (query, key, value, rpb) are bitwise identical for 1, 2 and 3 threads:
  the kernels' reductions do not depend on how work is split.
"""
import pytest
import torch

from nat_mm.ops import na2d, na2d_av, na2d_qk

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def build_backbone(backbone_type, device):
    models = pytest.importorskip('nat_mm.models')
    kwargs = dict(arch='mini', depths=(2, 2, 1, 1), kernel_size=5, drop_path_rate=0.2)
    if backbone_type == 'DiNAT':
        kwargs["dilations"] = [[1, 2], [1, 2], [1], [1]]
    return getattr(models, backbone_type)(**kwargs).to(device)


def two_training_steps(backbone_type, device, seed=0):
    """Losses and per-step gradients of two SGD steps (drop path active)."""
    torch.manual_seed(seed)
    if device == 'cuda':
        torch.cuda.manual_seed_all(seed)
    model = build_backbone(backbone_type, device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(2, 3, 64, 64, generator=generator).to(device)
    weights = None
    losses, grads = [], []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        feats = model(images)
        if weights is None:
            weights = [torch.randn(f.shape, generator=generator).to(device) for f in feats]
        loss = sum((f * w).mean() for f, w in zip(feats, weights))
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append({n: p.grad.detach().cpu().clone()
                      for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    return losses, grads, {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('backbone_type', ['NAT', 'DiNAT'])
def test_backbone_training_steps_bitwise(backbone_type, device, deterministic):
    losses_a, grads_a, params_a = two_training_steps(backbone_type, device)
    losses_b, grads_b, params_b = two_training_steps(backbone_type, device)
    for step in range(2):
        assert torch.equal(losses_a[step], losses_b[step]), f'loss of step {step}'
        assert grads_a[step].keys() == grads_b[step].keys()
        rpbs = [n for n in grads_a[step] if n.endswith('rpb')]
        assert rpbs, 'the backbone has relative position biases with gradients'
        for name, grad in grads_a[step].items():
            assert torch.equal(grad, grads_b[step][name]), f'step {step}: grad of {name}'
            assert torch.isfinite(grad).all(), name
    for name, value in params_a.items():
        assert torch.equal(value, params_b[name]), name


def op_grads(op, threads, seed=0, dtype=torch.float32):
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 3, 23, 19, 16)
    kernel, dilation = (7, 5), (2, 3)
    window = kernel[0] * kernel[1]

    def leaf(*size):
        return torch.randn(size, generator=generator, dtype=dtype).requires_grad_(True)

    if op == 'na2d_qk':
        inputs = dict(query=leaf(*shape), key=leaf(*shape),
                      rpb=leaf(3, 2 * kernel[0] - 1, 2 * kernel[1] - 1))
        out = na2d_qk(inputs['query'], inputs['key'], kernel, dilation, rpb=inputs['rpb'])
    elif op == 'na2d_av':
        inputs = dict(attn=leaf(*shape[:4], window), value=leaf(*shape))
        out = na2d_av(inputs['attn'], inputs['value'], kernel, dilation)
    else:
        inputs = dict(query=leaf(*shape), key=leaf(*shape), value=leaf(*shape),
                      rpb=leaf(3, 2 * kernel[0] - 1, 2 * kernel[1] - 1))
        out = na2d(inputs['query'], inputs['key'], inputs['value'], kernel, dilation,
                   rpb=inputs['rpb'])
    out.backward(torch.randn(out.shape, generator=generator, dtype=dtype))
    return out.detach(), {name: t.grad for name, t in inputs.items()}


@pytest.mark.parametrize('op', ['na2d_qk', 'na2d_av', 'na2d'])
def test_op_gradients_independent_of_thread_count(op, restore_threads):
    out_1, grads_1 = op_grads(op, threads=1)
    for threads in (2, 3):
        out_n, grads_n = op_grads(op, threads=threads)
        assert torch.equal(out_1, out_n), f'{op} output differs with {threads} threads'
        for name, grad in grads_1.items():
            assert torch.equal(grad, grads_n[name]), \
                f'{op}: grad of {name} differs between 1 and {threads} threads'


@pytest.mark.parametrize('op', ['na2d_qk', 'na2d'])
def test_rpb_grad_repeatable(op, restore_threads, deterministic):
    """Same call twice in one process (any thread count): bitwise the same rpb grad."""
    _, first = op_grads(op, threads=2, seed=3)
    _, second = op_grads(op, threads=2, seed=3)
    assert torch.equal(first['rpb'], second['rpb'])
