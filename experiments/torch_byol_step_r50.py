"""A copy of ../shared/bench/torch_byol_step.py (read-only there) with one addition: `--arch r50`.

Why a copy: issue #13 asks for a ResNet-50 row beside the PyTorch yardstick, and the shared
yardstick has only ResNet-18. Everything the shared file does is unchanged below (same step,
same SGD-momentum, same EMA, same timing); `r50` adds a bottleneck ResNet-50 built like
byol_jax's (1x1 -> 3x3 with the stride -> 1x1, expansion 4, a projection shortcut on the first
block of every stage, stages (3, 4, 6, 3), 2048-d features into the same heads; ImageNet stem).
experiments/benchmark_vs_torch.py runs this file for every row, so all rows use one yardstick
(diff it against the shared file to check: apart from this docstring, only the lines marked
`# r50` and `# gpu` differ). `--device cuda` and `--bf16` (autocast) are for the GPU side of
experiments/gpu_benchmark.sh; the default (CPU, float32) is the shared file's behaviour. The
shared file's own docstring follows unchanged.
"""
"""PyTorch BYOL training step on random data: the side-by-side yardstick for step throughput.

Same work as one BYOL step: online encoder+projector+predictor on both views, target
encoder+projector (no grad) on both views, symmetric 2-2cos loss, SGD-momentum update,
EMA target update. ResNet-18 (CIFAR stem: 3x3 stride 1, no max-pool; or ImageNet stem).

Setup, outside the project (the CPU build of torch 2.13.0 lies on the machine's disk):
    python -m venv torchvenv && torchvenv/bin/pip install torch==2.13.0
Run:  torchvenv/bin/python ../shared/bench/torch_byol_step.py --arch r18_cifar --size 32 --batch 256
      (--width 0.25 --hidden 1024 --batch 64 for the CPU CIFAR preset; --channels_last is often
      faster on CPU: compare against torch's better format)
Last line printed is JSON: {"impl": "torch", "images_per_s": ..., ...}
"""
import argparse, copy, json, time

import torch
import torch.nn as nn
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--arch", default="r18_cifar", choices=["r18_cifar", "r18_imagenet", "r50"])  # r50
p.add_argument("--size", type=int, default=32)
p.add_argument("--batch", type=int, default=256)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--max_seconds", type=float, default=120)
p.add_argument("--width", type=float, default=1.0, help="channel multiplier of the ResNet-18")
p.add_argument("--hidden", type=int, default=4096, help="projector/predictor hidden size")
p.add_argument("--channels_last", action="store_true", help="NHWC memory format (often faster on CPU)")
p.add_argument("--device", default="cpu", help="cpu or cuda")  # gpu
p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")  # gpu
args = p.parse_args()
torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.sc = (nn.Sequential() if stride == 1 and cin == cout else
                   nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.sc(x))


class ResNet18(nn.Module):
    def __init__(self, cifar, width):
        super().__init__()
        c = [max(1, int(n * width)) for n in (64, 128, 256, 512)]
        self.out = c[-1]
        if cifar:
            self.stem = nn.Sequential(nn.Conv2d(3, c[0], 3, 1, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, c[0], 7, 2, 3, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        layers, cin = [], c[0]
        for cout, stride in zip(c, [1, 2, 2, 2]):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(self.stem(x)).mean((2, 3))


class Bottleneck(nn.Module):  # r50
    def __init__(self, cin, cout, stride):  # r50
        super().__init__()  # r50
        mid = cout // 4  # r50
        self.c1, self.b1 = nn.Conv2d(cin, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid)  # r50
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)  # r50
        self.c3, self.b3 = nn.Conv2d(mid, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)  # r50
        self.sc = (nn.Sequential() if stride == 1 and cin == cout else  # r50
                   nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))  # r50
    def forward(self, x):  # r50
        y = F.relu(self.b1(self.c1(x)))  # r50
        y = F.relu(self.b2(self.c2(y)))  # r50
        return F.relu(self.b3(self.c3(y)) + self.sc(x))  # r50


class ResNet50(nn.Module):  # r50
    def __init__(self, width):  # r50
        super().__init__()  # r50
        stem = max(1, int(64 * width))  # r50
        c = [max(1, int(n // 4 * width)) * 4 for n in (256, 512, 1024, 2048)]  # r50
        self.out = c[-1]  # r50
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),  # r50
                                  nn.MaxPool2d(3, 2, 1))  # r50
        layers, cin = [], stem  # r50
        for cout, stride, n in zip(c, [1, 2, 2, 2], (3, 4, 6, 3)):  # r50
            layers += [Bottleneck(cin, cout, stride)] + [Bottleneck(cout, cout, 1) for _ in range(n - 1)]  # r50
            cin = cout  # r50
        self.layers = nn.Sequential(*layers)  # r50
    def forward(self, x):  # r50
        return self.layers(self.stem(x)).mean((2, 3))  # r50


def mlp(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))


class Online(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = (ResNet50(args.width) if args.arch == "r50" else  # r50
                    ResNet18(args.arch == "r18_cifar", args.width))  # r50
        self.proj = mlp(self.enc.out, args.hidden, 256)
        self.pred = mlp(256, args.hidden, 256)


online = Online().to(args.device)  # gpu
if args.channels_last:
    online = online.to(memory_format=torch.channels_last)
target = copy.deepcopy(online)
for q in target.parameters():
    q.requires_grad_(False)
decay = [q for q in online.parameters() if q.ndim > 1]
nodecay = [q for q in online.parameters() if q.ndim <= 1]
opt = torch.optim.SGD([{"params": decay, "weight_decay": 1.5e-6}, {"params": nodecay, "weight_decay": 0}],
                      lr=0.2, momentum=0.9)


def regression(q, z):
    return 2 - 2 * F.cosine_similarity(q, z.detach(), dim=-1)


def step(v1, v2):
    autocast = torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=args.bf16)  # gpu
    autocast.__enter__()  # gpu
    q1 = online.pred(online.proj(online.enc(v1)))
    q2 = online.pred(online.proj(online.enc(v2)))
    with torch.no_grad():
        z1 = target.proj(target.enc(v1))
        z2 = target.proj(target.enc(v2))
    loss = (regression(q1, z2) + regression(q2, z1)).mean()
    autocast.__exit__(None, None, None)  # gpu
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for pt, po in zip(target.parameters(), online.parameters()):
            pt.mul_(0.99).add_(po, alpha=0.01)
    return loss


shape = (args.batch, 3, args.size, args.size)
fmt = torch.channels_last if args.channels_last else torch.contiguous_format
rand = lambda: torch.rand(shape, device=args.device).contiguous(memory_format=fmt)  # gpu
sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)  # gpu
t0 = time.time()
step(rand(), rand())
sync()  # gpu
first = time.time() - t0
times, start = [], time.time()
for i in range(args.steps):
    v1, v2 = rand(), rand()
    t0 = time.time()
    loss = step(v1, v2)
    sync()  # gpu
    times.append(time.time() - t0)
    if time.time() - start > args.max_seconds:
        break
times.sort()
median = times[len(times) // 2]
print(json.dumps({"impl": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "arch": args.arch, "width": args.width, "hidden": args.hidden,
                  "channels_last": args.channels_last, "device": args.device, "bf16": args.bf16, "size": args.size, "batch": args.batch, "steps": len(times),  # gpu
                  "first_step_s": round(first, 3), "median_step_s": round(median, 4),
                  "images_per_s": round(args.batch / median, 2)}))
