"""Train a small ViT for weakly supervised object localisation, with and without SCM.

    python examples/train_wsol.py --mode quick            # < 2 minutes on 2 CPU cores
    python examples/train_wsol.py --mode full --seed 1    # < 15 minutes
    torchrun --nproc_per_node=2 examples/train_wsol.py --mode quick   # DDP, gloo on CPU

Trains on image labels only, on the synthetic shapes benchmark (synthetic_shapes.py).
As in the paper, where TS-CAM and SCM both fine-tune an ImageNet-pretrained DeiT, both
models here fine-tune one shared backbone: first a ViT is pretrained with image labels
(GAP of S0, the TS-CAM objective) on the training split, since no pretrained weights can
be downloaded; then two copies are fine-tuned for the same number of epochs, the TS-CAM
baseline (loss on GAP of S0) and SCM (loss on GAP of S after scm_ops.ActivationDiffusion).
At inference SCM is dropped and both localise with F0 * S0[c] (SPEC sections 2 and 6).
Writes, under --out: metrics.json, a printed table (baseline, scm, the pretrained starting
point and the floors), figure.png and checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scm_ops  # noqa: E402
from scm_ops.wsol import BoxEvaluator  # noqa: E402
from synthetic_shapes import CLASSES, make_split  # noqa: E402

MODES = {  # images, pretraining and fine-tuning epochs; sized for a 2-core CPU
    "quick": dict(train=1200, test=300, pretrain_epochs=2, epochs=2),
    "full": dict(train=6000, test=1000, pretrain_epochs=30, epochs=5),
}
IMAGE, PATCH = 64, 8
PRETRAIN_LR = float(os.environ.get("WSOL_PRETRAIN_LR", "2e-3"))
LR = float(os.environ.get("WSOL_LR", "5e-4"))  # fine-tuning, both models
GRID = (IMAGE // PATCH, IMAGE // PATCH)


# ----------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).softmax(-1)  # [B, heads, T, T]
        return self.proj((attn @ v).transpose(1, 2).reshape(B, T, D)), attn


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y, attn = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class TinyViT(nn.Module):
    """A ViT exposing each block's post-softmax attention, with TS-CAM heads:
    F0 from class-token attention (scm_ops.attention_map_from_blocks) and S0 from a 3x3
    conv over the final-norm patch tokens."""

    def __init__(self, num_classes, dim=96, depth=4, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, PATCH, PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + GRID[0] * GRID[1], dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Conv2d(dim, num_classes, 3, padding=1)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        attns = []
        for blk in self.blocks:
            x, a = blk(x)
            attns.append(a)
        tokens = self.norm(x)[:, 1:]
        s0 = self.head(tokens.transpose(1, 2).reshape(len(x), -1, *GRID))
        f0 = scm_ops.attention_map_from_blocks(attns, GRID)
        return f0, s0


class WSOLModel(nn.Module):
    """Backbone plus, for SCM, the activation diffusion stack used in training only."""

    def __init__(self, num_classes, use_scm):
        super().__init__()
        self.backbone = TinyViT(num_classes)
        self.scm = scm_ops.ActivationDiffusion(GRID) if use_scm else None

    def forward(self, images):
        f0, s0 = self.backbone(images)
        if self.training and self.scm is not None:
            _, s = self.scm(f0, s0)
            return s.mean((2, 3)), f0, s0
        return s0.mean((2, 3)), f0, s0


# ----------------------------------------------------------------------------- training
def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*args):
    if is_main():
        print(*args, flush=True)


def train(model, images, labels, epochs, seed, desc, lr):
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    batch = 64 // world
    steps_per_epoch = len(images) // (batch * world)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    bar = tqdm(total=total, desc=desc, disable=None if is_main() else True, mininterval=2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)  # same on every rank: then sharded
        for step in range(steps_per_epoch):
            idx = order[(step * world + rank) * batch:(step * world + rank + 1) * batch]
            x = torch.from_numpy(images[idx.numpy()])
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(3)
            logits, _, _ = net(x)
            loss = F.cross_entropy(logits, torch.from_numpy(labels[idx.numpy()]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # SCM's (1 + tau) products scale S up to 16x
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model


@torch.no_grad()
def predict(model, images, batch=200):
    model.eval()
    out = [model(torch.from_numpy(images[i:i + batch])) for i in range(0, len(images), batch)]
    logits, f0, s0 = (torch.cat(t) for t in zip(*out))
    return logits, f0, s0


def evaluate(model, images, labels, boxes):
    logits, f0, s0 = predict(model, images)
    maps = scm_ops.localization_map(f0, s0, torch.from_numpy(labels))
    ev = BoxEvaluator((IMAGE, IMAGE))
    ev.accumulate(maps.numpy(), boxes[:, None], labels, logits.numpy())
    return ev.compute(), dict(logits=logits, f0=f0, s0=s0, maps=maps)


def fixed_box_floor(box, boxes, labels, logits):
    ev = BoxEvaluator((IMAGE, IMAGE))
    ev.accumulate_boxes([box] * len(boxes), boxes[:, None], labels, logits.numpy())
    return ev.compute()


# ----------------------------------------------------------------------------- outputs
def figure(path, images, labels, boxes, runs, n=6):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scm_ops.wsol import boxes_at_thresholds, box_iou, normalize_map
    cols = ["image"] + [f"{name}: {c}" for name in runs for c in ("F0", "S0[c]", "F0*S0[c]")]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.9 * len(cols), 1.9 * n))
    colours = {"baseline": "red", "scm": "deepskyblue"}
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(images[i].transpose(1, 2, 0))
        x0, y0, x1, y1 = boxes[i]
        ax.add_patch(plt.Rectangle((x0 - .5, y0 - .5), x1 - x0 + 1, y1 - y0 + 1, fill=False, ec="lime", lw=1.5))
        for name, (res, thr) in runs.items():
            scaled = normalize_map(res["maps"][i].numpy(), (IMAGE, IMAGE))
            cand = boxes_at_thresholds(scaled, [thr])[0]
            b = cand[box_iou(cand, boxes[i:i + 1])[:, 0].argmax()]
            ax.add_patch(plt.Rectangle((b[0] - .5, b[1] - .5), b[2] - b[0] + 1, b[3] - b[1] + 1, fill=False,
                                       ec=colours[name], lw=1.2, ls="--"))
        ax.set_title(CLASSES[labels[i]], fontsize=8)
        col = 1
        for name, (res, _) in runs.items():
            c = labels[i]
            for m in (res["f0"][i], res["s0"][i, c], res["maps"][i]):
                axes[i, col].imshow(m.numpy(), cmap="jet")
                col += 1
    for j, c in enumerate(cols):
        axes[0, j].set_title(c if j else axes[0, 0].get_title(), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("green: ground truth; red dashed: baseline box; blue dashed: SCM box", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default runs/<mode>-seed<seed>)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    cfg = MODES[args.mode]
    out = args.out or f"runs/{args.mode}-seed{args.seed}"
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    tr_images, tr_labels, _, _ = make_split(cfg["train"], args.seed, "train")
    te_images, te_labels, _, te_boxes = make_split(cfg["test"], args.seed, "test")
    log(f"data: {cfg['train']} train / {cfg['test']} test images, {len(CLASSES)} classes "
        f"({time.time() - t0:.0f} s)")

    results, outputs = {}, {}
    torch.manual_seed(args.seed)
    pretrained = WSOLModel(len(CLASSES), use_scm=False)
    if is_main():
        results["untrained"], _ = evaluate(pretrained, te_images, te_labels, te_boxes)
    train(pretrained, tr_images, tr_labels, cfg["pretrain_epochs"], args.seed, "pretrain", PRETRAIN_LR)
    if is_main():
        torch.save(pretrained.state_dict(), os.path.join(out, "pretrained.pt"))
        results["pretrained"], _ = evaluate(pretrained, te_images, te_labels, te_boxes)
    for name in ("baseline", "scm"):
        torch.manual_seed(args.seed)
        model = WSOLModel(len(CLASSES), use_scm=name == "scm")
        model.backbone.load_state_dict(pretrained.backbone.state_dict())  # same start for both
        train(model, tr_images, tr_labels, cfg["epochs"], args.seed + 1, name, LR)
        if is_main():
            torch.save(model.state_dict(), os.path.join(out, f"{name}.pt"))
            results[name], outputs[name] = evaluate(model, te_images, te_labels, te_boxes)
    if is_main():
        logits = outputs["baseline"]["logits"]
        q = IMAGE // 4
        results["whole_image_box"] = fixed_box_floor((0, 0, IMAGE - 1, IMAGE - 1), te_boxes, te_labels, logits)
        results["centred_box"] = fixed_box_floor((q, q, IMAGE - 1 - q, IMAGE - 1 - q), te_boxes, te_labels, logits)
        keys = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc_v2")
        table = {k: {m: round(v[m], 2) for m in keys} for k, v in results.items()}
        summary = dict(mode=args.mode, seed=args.seed, world_size=world, seconds=round(time.time() - t0, 1),
                       note="box floors use the baseline's class predictions for top1_cls/top1_loc",
                       results=table)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log(f"\n{'':16s}" + "".join(f"{k:>14s}" for k in keys))
        for name in ("baseline", "scm", "pretrained", "whole_image_box", "centred_box", "untrained"):
            log(f"{name:16s}" + "".join(f"{table[name][k]:14.2f}" for k in keys))
        figure(os.path.join(out, "figure.png"), te_images, te_labels, te_boxes,
               {n: (outputs[n], results[n]["best_threshold"]) for n in ("baseline", "scm")})
        log(f"\nwrote {out}/metrics.json, figure.png, baseline.pt, scm.pt in {time.time() - t0:.0f} s")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
