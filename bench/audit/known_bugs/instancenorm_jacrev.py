import torch
from torch import nn
from torch.func import functional_call, hessian
net = nn.Sequential(nn.Conv1d(2, 3, 2), nn.InstanceNorm1d(3, affine=True), nn.Tanh(),
                    nn.Flatten(), nn.Linear(12, 1)).double()
x, y = torch.randn(4, 2, 5).double(), torch.randn(4, 1).double()
p = {k: v.detach() for k, v in net.named_parameters()}
H = hessian(lambda p: ((functional_call(net, p, (x,)) - y) ** 2).mean())(p)
# d2L/d(InstanceNorm weight)d(first weight) must be the transpose of its mirror block
a, b = H["1.weight"]["0.weight"], H["0.weight"]["1.weight"].permute(3, 0, 1, 2)
bug_shows = bool((a - b).abs().max() > 1e-6 * a.abs().max())
