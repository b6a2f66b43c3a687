"""Weakly supervised object localisation with a ViT: the TS-CAM baseline against SCM.

    python examples/train_wsol.py --mode quick             # about 1-2 min on 2 CPU cores: smoke check
    python examples/train_wsol.py --mode full --seed 1     # the synthetic benchmark, one seed
    python examples/train_wsol.py --mode study --seed 1 --threads 1   # one seed of examples/study.py
    python examples/train_wsol.py --mode pretrain          # remakes examples/pretrained/tinyvit_parts.pt
    python examples/train_wsol.py --dataset cub --data-root CUB_200_2011 --mode quick
    python examples/train_wsol.py --dataset wsol --metadata-root metadata/ILSVRC --data-root ILSVRC
    python examples/train_wsol.py --backbone deit_small_patch16_224 --dataset cub ...  # needs timm
    python examples/train_wsol.py --backbone hf:deit --image-size 224 ...  # needs transformers
    torchrun --nproc_per_node=2 examples/train_wsol.py --mode quick   # DDP (gloo on the CPU)

Both models train on image labels only and start from one pretrained backbone, as in the
paper (where both fine-tune an ImageNet-pretrained DeiT): the TS-CAM baseline with the loss
on GAP(S0), SCM with the loss on GAP(S) after scm_ops.ActivationDiffusion. F0 is the
class-token attention summed over blocks (scm_ops.attention.ClassAttentionRecorder, which
reads it from the unmodified attention modules), S0 a 3 x 3 conv over the final-norm patch
tokens. At inference SCM is dropped and both localise with F0 * S0[c]. Writes, under
--out: metrics.json (results, and per training step the loss, LR and each SCM block's lam
and beta, with probes of the spreading on held-out images), figure.png, training.png (the
history), baseline.pt and scm.pt. See docs/example.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scm_ops  # noqa: E402
from scm_ops.attention import ClassAttentionRecorder  # noqa: E402
from scm_ops.wsol import BoxEvaluator  # noqa: E402
from backbone import build_backbone  # noqa: E402
import datasets  # noqa: E402

SHIPPED_BACKBONE = os.path.join(HERE, "pretrained", "tinyvit_parts.pt")
# Sizes per mode for the synthetic benchmark (images, epochs); on real data quick mode takes
# seeded subsets of the same sizes and full mode the whole splits.
MODES = {
    "quick": dict(train=512, test=256, epochs=1, lr=5e-5),
    "full": dict(train=2400, test=600, epochs=4, lr=5e-4),
    # examples/study.py's setting, per seed: the published recipe (batch 16, constant LR, /10 for the last
    # epoch) scaled to 450 steps: LR x steps 0.45, as the published 5e-5 x about 11,000 steps (0.55)
    "study": dict(train=2400, test=600, epochs=3, lr=1e-3, batch=16, schedule="step"),
    "pretrain": dict(train=3000, test=500, epochs=10, lr=2e-3),
}


# ----------------------------------------------------------------------------- model
class WSOLModel(nn.Module):
    """A backbone with TS-CAM heads and, for SCM, the activation diffusion stack (training
    only). forward(images [B, 3, S, S]) -> logits [B, C], F0 [B, H, W], S0 [B, C, H, W].
    Logits are the spatial mean of S0 (of S after SCM in training), or with
    token_classes the class-token classifier's (the DeiT-style pretraining)."""

    def __init__(self, backbone: nn.Module, num_classes: int, use_scm: bool, token_classes: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.embed_dim, num_classes, 3, padding=1)
        # S0 starts uniform (zero weights, bias 1), so F0 * S0[c] starts as F0 and the class
        # evidence is learnt on top of it; a randomly initialised head would scramble F0.
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, 1.0)
        self.token_head = nn.Linear(backbone.embed_dim, token_classes) if token_classes else None
        self.scm = scm_ops.ActivationDiffusion(backbone.grid) if use_scm else None
        self.recorder = ClassAttentionRecorder(backbone.attention_modules, backbone.grid,
                                               num_prefix_tokens=backbone.num_prefix_tokens).open()

    def forward(self, images):
        cls, tokens = self.backbone.tokens(images)                  # [B, dim], [B, N, dim]
        f0 = self.recorder.attention_map()                          # [B, H, W]
        s0 = self.head(tokens.transpose(1, 2).reshape(len(tokens), -1, *self.backbone.grid))
        if self.token_head is not None:
            return self.token_head(cls), f0, s0
        if self.training and self.scm is not None:
            _, s = self.scm(f0, s0)
            return s.mean((2, 3)), f0, s0
        return s0.mean((2, 3)), f0, s0


def load_pretrained(model: WSOLModel, path: str) -> dict:
    """Loads the backbone of a checkpoint written by --mode pretrain (the TS-CAM head starts
    afresh). Returns the checkpoint's metadata."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["backbone_config"] != model.backbone.config:
        raise ValueError(f"{path} holds a backbone {ckpt['backbone_config']}, the model is "
                         f"{model.backbone.config}: pass --pretrained none or a matching checkpoint")
    model.backbone.load_state_dict({k: v.float() for k, v in ckpt["backbone"].items()})
    return {k: v for k, v in ckpt.items() if k != "backbone"}


# ----------------------------------------------------------------------------- training
def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*args):
    if is_main():
        print(*args, flush=True)


def param_groups(model, weight_decay):
    """The published code's optimiser groups (timm's create_optimizer): every 1-D parameter
    and bias (norm weights, each SCM block's lam and beta) without weight decay, the rest
    with `weight_decay`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(schedule, step, total, steps_per_epoch):
    """The LR multiplier at a step. 'cosine': linear warm-up over 10 % of the steps, then a
    cosine decay; 'step' (the published schedule): constant, divided by 10 for the last
    epoch (of more than one)."""
    if schedule == "step":
        return 0.1 if total > steps_per_epoch and step >= total - steps_per_epoch else 1.0
    warm = max(1, total // 10)
    return (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def box_patches(boxes, grid, size):
    """[B, H, W] bool: the patches whose centre lies in one of each image's boxes (x0, y0, x1, y1
    in pixels of a size x size image)."""
    h, w = grid
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) * size / h
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) * size / w
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, b in enumerate(boxes):
        for x0, y0, x1, y1 in np.asarray(b, dtype=np.float64).reshape(-1, 4):
            masks[i] |= ((cy >= y0) & (cy <= y1))[:, None] & ((cx >= x0) & (cx <= x1))[None, :]
    return masks


def top_share(maps, masks):
    """Mean over images of the share of a map's k highest patches that lie in the box, k the
    box's patch count (the calibration demo's measure): maps [B, H, W], masks [B, H, W] bool."""
    shares = []
    for m, inside in zip(maps.flatten(1), masks.flatten(1)):
        k = max(1, int(inside.sum()))
        shares.append(inside[m.topk(k).indices].float().mean().item())
    return float(np.mean(shares))


@torch.no_grad()
def spreading(model, images, labels, boxes, keep=0):
    """Spreading on held-out images [B, 3, S, S]: top_share of F0, of F after each SCM block
    (SCM models) and of the inference map F0 * S0[c] (c the true class). With keep, also
    "maps": float16 [keep, 1 + blocks, H, W], F0 and F after each block of the first images."""
    from scm_figure import block_outputs
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    _, f0, s0 = (t.float() for t in model(images.to(device)))
    masks = box_patches(boxes, f0.shape[-2:], images.shape[-1])
    out = {"f0": top_share(f0.cpu(), masks)}
    fs = [f for f, _ in block_outputs(model.scm, f0, s0)] if model.scm is not None else []
    if fs:
        out["f"] = [top_share(f, masks) for f in fs]
    if keep:
        out["maps"] = torch.stack([f0.cpu()] + fs, 1)[:keep].half().numpy()
    out["map"] = top_share(scm_ops.localization_map(f0, s0, labels.to(device)).cpu(), masks)
    model.train(was)
    return out


def train(model, dataset, epochs, seed, desc, lr, workers=0, batch_size=64, loss_fn=None, schedule="cosine",
          weight_decay=0.05, probe=None, probes=16):
    """AdamW (param_groups) with the LR schedule lr_factor; loss_fn(model outputs, labels)
    defaults to the cross-entropy of the logits. probe: held-out (images, labels, boxes) whose
    spreading is measured before training, `probes` times during it and at the end. Returns
    the history: per step the loss, LR and each SCM block's lam and beta; the probes (with,
    under "maps", F0 and F of the first two probe images: spreading's keep)."""
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    batch = batch_size // world
    steps_per_epoch = max(1, len(dataset) // (batch * world))
    total = epochs * steps_per_epoch
    probe_every = max(1, total // probes)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(schedule, t, total, steps_per_epoch))
    history = dict(step=[], loss=[], lr=[], lam=[], beta=[], probe=[])
    scm = getattr(model, "scm", None)

    def record_probe(step):
        if probe is not None and is_main():
            history["probe"].append(dict(step=step, **spreading(model, *probe, keep=2)))

    record_probe(0)
    bar = tqdm(total=total, desc=desc, disable=not is_main(), mininterval=5, file=sys.stdout)
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(dataset), generator=g)  # the same on every rank, then sharded
        batches = [order[(s * world + rank) * batch:(s * world + rank + 1) * batch].tolist()
                   for s in range(steps_per_epoch)]
        flips = torch.rand(steps_per_epoch, generator=g) < 0.5
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             collate_fn=datasets.collate)
        for flip, (x, y, _) in zip(flips, loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if flip:
                x = x.flip(3)
            outputs = net(x)
            loss = loss_fn(outputs, y) if loss_fn is not None else F.cross_entropy(outputs[0], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # SCM's (1 + tau) products scale S up to 16x
            history["lr"].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            step += 1
            history["step"].append(step)
            history["loss"].append(round(loss.item(), 5))
            if scm is not None:
                history["lam"].append([round(v, 6) for v in scm.lam.detach().float().tolist()])
                history["beta"].append([round(v, 6) for v in scm.beta.detach().float().tolist()])
            if step % probe_every == 0 and step < total:
                record_probe(step)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    record_probe(step)
    return history


@torch.no_grad()
def evaluate(model, dataset, desc, keep=6, workers=0, batch=128, f0_only=False, classify=True):
    """Metrics of F0 * S0[c] (c the ground-truth class; F0 alone with f0_only) against the
    boxes, and the first `keep` images with their maps for the figure."""
    from tqdm import tqdm
    model.eval()
    size = model.backbone.image_size
    ev = BoxEvaluator((size, size))
    kept = dict(images=[], labels=[], boxes=[], f0=[], s0=[], s0_all=[], maps=[], logits=[])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=datasets.collate)
    device = next(model.parameters()).device
    for x, y, boxes in tqdm(loader, desc=desc, disable=not is_main(), mininterval=5, file=sys.stdout):
        logits, f0, s0 = (t.float().cpu() for t in model(x.to(device)))
        maps = f0 if f0_only else scm_ops.localization_map(f0, s0, y)
        ev.accumulate(maps.numpy(), boxes, y.numpy(), logits.numpy() if classify else None)
        if len(kept["labels"]) < keep:
            kept["images"] += list(x[:keep].numpy())
            kept["labels"] += y[:keep].tolist()
            kept["boxes"] += boxes[:keep]
            kept["f0"] += list(f0[:keep].numpy())
            kept["s0"] += list(s0[torch.arange(len(y)), y][:keep].numpy())
            kept["s0_all"] += list(s0[:keep].numpy())
            kept["maps"] += list(maps[:keep].numpy())
            kept["logits"] += list(logits[:keep].numpy())
    return ev.compute(), {k: v[:keep] for k, v in kept.items()}


def fixed_box_floor(box, dataset):
    """Metrics of one fixed box (x0, y0, x1, y1) for every image (no classification)."""
    size = dataset[0][0].shape[-1]
    ev = BoxEvaluator((size, size))
    for _, y, boxes in torch.utils.data.DataLoader(dataset, batch_size=128, collate_fn=datasets.collate):
        ev.accumulate_boxes([box] * len(y), boxes, y.numpy())
    return ev.compute()


# ----------------------------------------------------------------------------- outputs
def largest_contour_box(cam, size, threshold):
    """The box of the largest contour of a map at a threshold (for drawing), wsolevaluation's
    conventions: resized, min-max, uint8, foreground > threshold * max."""
    import cv2
    from scm_ops.wsol import normalize_map
    scaled = (normalize_map(cam, (size, size)) * 255).astype(np.uint8)
    _, mask = cv2.threshold(scaled, int(threshold * scaled.max()), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if not contours:
        return None
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    return x, y, min(x + w, size - 1), min(y + h, size - 1)


def figure(path, classes, runs, size, scm_module=None, title=None):
    """Per test image, one row (examples/scm_figure.py): the image with the ground-truth box
    and each model's box (largest contour at its best threshold); the SCM model's F0 and F
    after each block of its trained stack, then the TS-CAM baseline's F0 (one colour scale);
    the SCM model's S0[c] and the S[c] its training loss saw, then the baseline's S0[c] (one
    colour scale); the two models' inference maps F0 * S0[c] (one colour scale); c is the
    true class. Without scm_module the stack's columns are left out."""
    import matplotlib
    matplotlib.use("Agg")
    from scm_figure import render
    scm, base = runs["scm"][0], runs["baseline"][0]
    samples = []
    for i, label in enumerate(scm["labels"]):
        boxes = {"ground truth": scm["boxes"][i]}
        for key, name in (("baseline", "TS-CAM baseline"), ("scm", "SCM")):
            kept, thr = runs[key]
            box = largest_contour_box(kept["maps"][i], size, thr)
            if box is not None:
                boxes[name] = box
        samples.append(dict(
            f0=scm["f0"][i], s0=scm["s0_all"][i], label=label, image=scm["images"][i], boxes=boxes,
            predicted={"SCM": int(np.argmax(scm["logits"][i])), "TS-CAM baseline": int(np.argmax(base["logits"][i]))},
            extra_f={"TS-CAM baseline: F0": base["f0"][i]}, extra_s={"TS-CAM baseline: S0[c]": base["s0"][i]},
            extra_maps={"TS-CAM baseline: F0 * S0[c]": base["maps"][i]}))
    render(samples, scm_module, path=path, class_names=classes, title=title)


# ----------------------------------------------------------------------------- main
def load_data(args, size):
    """{"train", "test"} datasets for --dataset, sized by the mode."""
    if args.dataset == "synthetic":
        from synthetic_shapes import CLASSES, make_split
        n_train = args.train_size or MODES[args.mode]["train"]
        n_test = args.test_size or MODES[args.mode]["test"]
        if args.mode == "pretrain":   # training labels: texture * len(CLASSES) + badge class
            tr = make_split(n_train, args.seed, "pretrain", size, with_textures=True)
            te = make_split(n_test, args.seed, "test", size)
            return {"train": datasets.ArrayDataset(tr[0], tr[4] * len(CLASSES) + tr[1], tr[3], CLASSES),
                    "test": datasets.ArrayDataset(te[0], te[1], te[3], CLASSES)}
        tr = make_split(n_train, args.seed, "train", size)
        te = make_split(n_test, args.seed, "test", size)
        return {"train": datasets.ArrayDataset(tr[0], tr[1], tr[3], CLASSES),
                "test": datasets.ArrayDataset(te[0], te[1], te[3], CLASSES)}
    if not args.data_root:
        raise SystemExit(f"--dataset {args.dataset} needs --data-root")
    if args.dataset == "cub":
        data = datasets.cub_splits(args.data_root, size)
    else:
        if not args.metadata_root:
            raise SystemExit("--dataset wsol needs --metadata-root (a folder with train/ and test/ metadata)")
        data = datasets.wsol_splits(args.metadata_root, args.data_root, size, args.eval_split)
    quick = args.mode == "quick"
    n_train = args.train_size or (MODES["quick"]["train"] if quick else None)
    n_test = args.test_size or (MODES["quick"]["test"] if quick else None)
    return {"train": datasets.subset(data["train"], n_train, args.seed),
            "test": datasets.subset(data["test"], n_test, args.seed + 1)}


def describe(args, cfg, data, pretrained_path, weights):
    what = {"synthetic": "the synthetic parts benchmark (examples/synthetic_shapes.py)",
            "cub": f"CUB-200-2011 at {args.data_root}",
            "wsol": f"wsolevaluation metadata {args.metadata_root} over {args.data_root}"}[args.dataset]
    start = f"the pretrained backbone {os.path.relpath(pretrained_path)}" if pretrained_path else "the backbone"
    lines = [f"== mode {args.mode}, seed {args.seed}, backbone {args.backbone}, data: {what}",
             f"   backbone weights: {weights}",
             f"   {len(data['train'])} training / {len(data['test'])} test images, {len(data['train'].classes)} classes"]
    if args.mode == "pretrain":
        lines.append(f"   pretrains the backbone from scratch for {cfg['epochs']} epochs on another task than the "
                     f"badge: the body's texture, from a classifier on the class token (DeiT-style); "
                     f"writes {os.path.relpath(args.save_backbone)}")
    else:
        lines.append(f"   fine-tunes {start} for {cfg['epochs']} epoch(s) at LR {cfg['lr']:g} ({cfg['schedule']} "
                     f"schedule, batch {cfg['batch']}), twice: TS-CAM baseline and SCM; localises with F0 * S0[c]")
    if args.val_size:
        lines.append(f"   evaluates on {args.val_size} validation images held out of the training images, "
                     f"not on the test images")
    if args.mode == "quick":
        lines.append("   quick mode is a smoke check of the pipeline on a small subset: the numbers show the "
                     "maps localise, they are not a paper result")
    return "\n".join(lines)


def _floats(text):
    """'3' -> 3.0, '0.02,0.5,0.5,0.5' -> [0.02, 0.5, 0.5, 0.5] (an argparse type)."""
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--dataset", choices=("synthetic", "cub", "wsol"), default="synthetic")
    parser.add_argument("--data-root", help="cub: the CUB_200_2011 folder; wsol: the folder image ids are relative to")
    parser.add_argument("--metadata-root", help="wsol: the folder holding train/ and test/ (wsolevaluation's metadata/<DATASET>)")
    parser.add_argument("--eval-split", default="test", help="wsol: the metadata split to evaluate on (test or val)")
    parser.add_argument("--backbone", default="tiny", help="'tiny' (the example's ViT), a timm model name, "
                        "e.g. deit_small_patch16_224 or vit_small_patch16_dinov3 (needs timm), or hf:vit / hf:deit / "
                        "hf:dinov3 (a transformers ViT / DeiT / DINOv3ViT from a config, randomly initialised) / "
                        "hf:FOLDER (from_pretrained; needs transformers)")
    parser.add_argument("--backbone-args", type=json.loads, default=None, metavar="JSON",
                        help="model arguments for timm / hf backbones, e.g. '{\"depth\": 2, \"embed_dim\": 64}' "
                        "(timm.create_model) or '{\"num_hidden_layers\": 2, \"hidden_size\": 64}' (config fields)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default 112 tiny, 224 timm and "
                        "hf:vit / hf:deit, the config's for hf:FOLDER)")
    parser.add_argument("--pretrained", default=None, help="tiny: a checkpoint from --mode pretrain (default: "
                        "the shipped one); timm: a local weights file (default: timm's pretrained weights, "
                        "downloaded); 'none': random initialisation (tiny, timm; hf:vit / hf:deit always are)")
    parser.add_argument("--save-backbone", default=SHIPPED_BACKBONE, help="pretrain mode: where to write")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (split over DDP ranks; "
                        "default: the mode's)")
    parser.add_argument("--schedule", choices=("cosine", "step"), default=None, help="LR schedule: cosine "
                        "(warm-up, cosine decay) or step (the published one: constant, /10 for the last epoch)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (never on 1-D "
                        "parameters and biases, lam and beta included)")
    parser.add_argument("--lam", type=_floats, default=None, help="initial lam: one value, or one per SCM "
                        "block comma-separated (default 1.0)")
    parser.add_argument("--beta", type=_floats, default=None, help="initial beta, as --lam (default 0.5)")
    parser.add_argument("--val-size", type=int, default=0, help="hold this many training images out as a "
                        "validation split and evaluate on it instead of the test images (to choose a recipe)")
    parser.add_argument("--probe-images", type=int, default=32, help="held-out images whose spreading is "
                        "logged during training (the first of the evaluation split)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; "
                        "under torchrun each rank takes cuda:<local rank>)")
    parser.add_argument("--train-size", type=int, default=None, help="number of training images (override)")
    parser.add_argument("--test-size", type=int, default=None, help="number of test images (override)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default runs/<mode>-seed<seed>)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (image files)")
    args = parser.parse_args(argv)
    if args.mode == "pretrain" and args.dataset != "synthetic":
        parser.error("--mode pretrain makes the shipped synthetic backbone: use it with --dataset synthetic")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    cfg = dict(MODES[args.mode])
    cfg["epochs"] = args.epochs or cfg["epochs"]
    cfg["lr"] = args.lr or cfg["lr"]
    cfg["batch"] = args.batch_size or cfg.get("batch", 64)
    cfg["schedule"] = args.schedule or cfg.get("schedule", "cosine")
    scm_init = dict(lam=args.lam if args.lam is not None else cfg.get("lam", 1.0),
                    beta=args.beta if args.beta is not None else cfg.get("beta", 0.5))
    out = args.out or f"runs/{args.mode}-seed{args.seed}"
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    def new_model(use_scm, num_classes):
        torch.manual_seed(args.seed)
        model = WSOLModel(backbone(), num_classes, use_scm)
        if use_scm:
            with torch.no_grad():
                model.scm.lam.copy_(torch.tensor(scm_init["lam"]).expand_as(model.scm.lam))
                model.scm.beta.copy_(torch.tensor(scm_init["beta"]).expand_as(model.scm.beta))
        return model.to(device)

    def backbone():
        return build_backbone(args.backbone, args.image_size, args.pretrained if args.backbone != "tiny" else None,
                              args.backbone_args)

    probe = backbone()
    size = probe.image_size
    data = load_data(args, size)
    if args.val_size:   # the test images are neither trained on nor evaluated
        data = dict(zip(("train", "test"), datasets.split_off(data["train"], args.val_size, args.seed + 2)))
    eval_split = "val" if args.val_size else "test"
    classes = data["train"].classes
    pretrained_path = None
    if args.mode != "pretrain" and args.backbone == "tiny" and args.pretrained != "none":
        pretrained_path = args.pretrained or SHIPPED_BACKBONE
    weights = f"checkpoint {os.path.relpath(pretrained_path)}" if pretrained_path else probe.weights
    log(describe(args, cfg, data, pretrained_path, weights))
    results, kept = {}, {}
    if is_main():
        results["untrained"], _ = evaluate(new_model(False, len(classes)), data["test"], "eval untrained")

    if args.mode == "pretrain":
        from synthetic_shapes import TEXTURES
        torch.manual_seed(args.seed)
        nc = len(classes)
        model = WSOLModel(backbone(), nc, False,
                          token_classes=len(TEXTURES)).to(device)

        def texture_task(outputs, y):   # the body's texture from the class token
            return F.cross_entropy(outputs[0], y // nc)

        history = {"pretrain": train(model, data["train"], cfg["epochs"], args.seed, "pretrain", cfg["lr"],
                                     args.workers, cfg["batch"], loss_fn=texture_task, schedule=cfg["schedule"],
                                     weight_decay=args.weight_decay)}
        if is_main():
            textures = torch.cat([model(x)[0].argmax(1) for x, _, _ in torch.utils.data.DataLoader(
                data["train"], batch_size=256, collate_fn=datasets.collate)][:2])
            log(f"texture accuracy on the first 512 training images: "
                f"{100 * (textures.numpy() == data['train'].labels[:len(textures)] // nc).mean():.1f} %")
            model.token_head = None
            results["pretrained_f0"], _ = evaluate(model, data["test"], "eval pretrained F0", f0_only=True,
                                                   classify=False)
            os.makedirs(os.path.dirname(os.path.abspath(args.save_backbone)), exist_ok=True)
            torch.save(dict(backbone_config=model.backbone.config, classes=list(classes), seed=args.seed,
                            epochs=cfg["epochs"], lr=cfg["lr"], train_images=len(data["train"]),
                            backbone={k: v.half() for k, v in model.backbone.state_dict().items()}),
                       args.save_backbone)
    else:
        start = new_model(False, len(classes))
        if pretrained_path:
            load_pretrained(start, pretrained_path)
            if is_main():
                results["pretrained_f0"], _ = evaluate(start, data["test"], "eval pretrained F0", f0_only=True,
                                                       classify=False)
        probe = datasets.collate([data["test"][i] for i in range(min(args.probe_images, len(data["test"])))])
        history = {}
        for name in ("baseline", "scm"):
            model = new_model(name == "scm", len(classes))
            model.backbone.load_state_dict(start.backbone.state_dict())   # the same start for both
            model.head.load_state_dict(start.head.state_dict())
            history[name] = train(model, data["train"], cfg["epochs"], args.seed + 1, name, cfg["lr"], args.workers,
                                  cfg["batch"], schedule=cfg["schedule"], weight_decay=args.weight_decay,
                                  probe=probe if args.probe_images else None)
            scm_module = model.scm if name == "scm" else None   # for the figure
            if is_main():
                torch.save(model.state_dict(), os.path.join(out, f"{name}.pt"))
                results[name], kept[name] = evaluate(model, data["test"], f"eval {name}")

    if is_main():
        q = size // 4
        results["whole_image_box"] = fixed_box_floor((0, 0, size - 1, size - 1), data["test"])
        results["centred_box"] = fixed_box_floor((q, q, size - 1 - q, size - 1 - q), data["test"])
        keys = ("top1_cls", "top1_loc", "gt_known_loc", "maxboxacc_v2")
        table = {k: {m: round(v[m], 2) for m in keys if m in v} for k, v in results.items()}
        rows = [r for r in ("baseline", "scm", "pretrained_f0", "whole_image_box", "centred_box", "untrained")
                if r in table]
        summary = dict(mode=args.mode, dataset=args.dataset, backbone=args.backbone, seed=args.seed,
                       world_size=world, epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch"],
                       schedule=cfg["schedule"], weight_decay=args.weight_decay, no_weight_decay="1-D parameters "
                       "and biases (lam, beta included)", scm_init=scm_init, threads=torch.get_num_threads(),
                       train_images=len(data["train"]), eval_split=eval_split, test_images=len(data["test"]),
                       pretrained=pretrained_path and os.path.relpath(pretrained_path),
                       backbone_weights=weights, backbone_args=args.backbone_args,
                       seconds=round(time.time() - t0, 1),
                       note="gt_known_loc: largest-contour MaxBoxAcc at IoU 0.5 (scm_ops.wsol); box floors "
                            "have no classifier of their own; history: per training step, probes on the first "
                            f"{args.probe_images} evaluation images (top_share of F0, F per block, F0 * S0[c])",
                       results=table, history=history)
        maps = {}   # the probes' maps go to probe_maps.npz, the rest to metrics.json
        for name, h in history.items():
            for p in h["probe"]:
                maps[f"{name}_step{p['step']}"] = p.pop("maps")
        if maps:
            np.savez_compressed(os.path.join(out, "probe_maps.npz"), images=probe[0][:2].numpy(),
                                boxes=np.stack([b[0] for b in probe[2][:2]]), **maps)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=1)
        from summarize import plot_training
        plot_training([summary], os.path.join(out, "training.png"))
        log(f"\n{'':16s}" + "".join(f"{k:>14s}" for k in keys))
        for name in rows:
            log(f"{name:16s}" + "".join(f"{table[name][k]:14.2f}" if k in table[name] else f"{'-':>14s}"
                                        for k in keys))
        if args.mode != "pretrain":
            floor = max(table[r]["gt_known_loc"] for r in ("whole_image_box", "centred_box", "untrained"))
            margins = ", ".join(f"{n} {table[n]['gt_known_loc'] - floor:+.1f}" for n in ("baseline", "scm"))
            log(f"\nGT-known Loc above the best floor ({floor:.1f}): {margins} points")
            figure(os.path.join(out, "figure.png"), classes,
                   {n: (kept[n], results[n]["best_threshold"]) for n in ("baseline", "scm")}, size, scm_module,
                   title=f"{args.mode} mode, seed {args.seed}, first test images: the SCM model at work, "
                         f"the TS-CAM baseline's F0, S0[c], inference map and box beside it")
            log(f"wrote {out}/metrics.json, figure.png, training.png, baseline.pt, scm.pt in {time.time() - t0:.0f} s")
        else:
            log(f"wrote {args.save_backbone} and {out}/metrics.json in {time.time() - t0:.0f} s")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
