import torch
from torch import nn
attn = nn.MultiheadAttention(4, 2, batch_first=True).double().eval()
x = torch.randn(3, 5, 4).double()
w = attn.in_proj_weight
g = torch.autograd.grad(attn(x, x, x, need_weights=False)[0].pow(2).sum(), w,
                        create_graph=True)[0]
try:
    torch.autograd.grad(g.sum(), w)
    bug_shows = False
except RuntimeError as e:
    bug_shows = "not implemented" in str(e)
