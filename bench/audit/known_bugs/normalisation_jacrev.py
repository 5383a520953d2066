import torch
from torch import nn
from torch.func import functional_call, hessian
net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1)).double()
x, y = torch.randn(8, 4).double(), torch.randn(8, 1).double()
p = {k: v.detach() for k, v in net.named_parameters()}
H = hessian(lambda p: ((functional_call(net, p, (x,)) - y) ** 2).mean())(p)
# d2L/d(LayerNorm weight)d(first weight) must be the transpose of its mirror block
a, b = H["1.weight"]["0.weight"], H["0.weight"]["1.weight"].permute(2, 0, 1)
bug_shows = bool((a - b).abs().max() > 1e-6 * a.abs().max())
