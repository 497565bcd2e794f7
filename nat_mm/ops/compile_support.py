"""What autograd.call needs inside torch.compile, imported only there: these decorators
import torch._dynamo (about a second), which an eager user should not wait for."""
import torch

from .autograd import function_call

# the Function outside the graph: a graph break around each NA op
function_outside_the_graph = torch.compiler.disable(function_call)


@torch.compiler.assume_constant_result
def differentiating() -> bool:
    """Whether a torch.func grad or jvp transform is active (read while dynamo traces)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() in (TransformType.Grad, TransformType.Jvp)
               for i in retrieve_all_functorch_interpreters())
