"""What autograd.call needs inside torch.compile, imported only there: these decorators
import torch._dynamo (about a second), which an eager user should not wait for."""
import torch

from . import autograd

# the Function outside the graph: a graph break around each NA op
function_outside_the_graph = torch.compiler.disable(autograd.function_call)


# whether a torch.func grad or jvp transform is active, read while dynamo traces
differentiating = torch.compiler.assume_constant_result(autograd.differentiating)
