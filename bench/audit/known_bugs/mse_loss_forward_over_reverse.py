import torch
import torch.nn.functional as F
from torch.func import grad, jvp
x, y = torch.randn(5).double(), torch.randn(5).double()
f = lambda w: F.mse_loss(w * x, y)
w, v = torch.ones(5).double(), torch.ones(5).double()
try:
    jvp(grad(f), (w,), (v,))
    bug_shows = False
except RuntimeError as e:
    bug_shows = "ZeroTensors are immutable" in str(e)
