import torch
from torch import nn
from torch.func import functional_call
gru = nn.GRU(3, 4, batch_first=True).double()
x = torch.randn(2, 3, 3).double()
names = [n for n, _ in gru.named_parameters()]
flat = torch.cat([p.detach().reshape(-1) for p in gru.parameters()])
shapes = [p.shape for p in gru.parameters()]
def f(v):
    parts = torch.split(v, [s.numel() for s in shapes])
    p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
    return functional_call(gru, p, (x,))[0].pow(2).sum()
try:
    torch.autograd.functional.hessian(f, flat, vectorize=True,
                                      outer_jacobian_strategy="forward-mode")
    bug_shows = False
except RuntimeError as e:
    bug_shows = "Batching rule not implemented" in str(e)
