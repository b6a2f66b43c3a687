"""A figure of SCM at work on your own model and images: F0 through each activation
diffusion block, S0[c] against the S[c] the training loss sees, and the inference map.

    from scm_figure import render
    render([dict(f0=f0, s0=s0, label=3, predicted=1, image=img,
                 boxes={"ground truth": gt_box, "SCM": box})],
           model.scm, class_names=names, path="scm.png")

One row per sample, left to right:

- the image with its boxes (ground truth, TS-CAM baseline, SCM, or any other name), when
  an image is given;
- F0, then F after each block of the stack: one colour scale for the whole group, so the
  growth of F from block to block is visible (F <- F + tau, tau in [0, 1] per block);
- S0[c], then S[c] after the stack (S <- S * (1 + tau) per block), on one colour scale:
  the spatial mean of S is what the training loss sees, the spatial mean of S0 is what
  classifies at inference;
- the inference map F0 * S0[c] (SCM is dropped at inference), with the boxes drawn on it,
  then any further maps passed in ``extra_maps`` (e.g. the baseline's), on the same scale;
  ``extra_f`` and ``extra_s`` likewise add maps (e.g. another model's F0 and S0[c]) at the
  end of the F and the S group, on those groups' scales.

c is the true class (as the WSOL evaluation protocol uses), unless ``class_index`` says
otherwise. The per-block values come from modules holding the first k blocks of the given
module (the same lam, beta and settings): ``ActivationDiffusion`` itself returns only the
final (F, S). matplotlib is needed here, not by scm_ops.
"""
from __future__ import annotations

import numpy as np
import torch

import scm_ops

# Box styles: colour, line style and width differ, and a black edge keeps each line visible
# on any image. Thinner lines are drawn over thicker ones: the dotted SCM box over a dashed
# baseline box in the same place leaves both visible.
BOX_STYLES = {
    "ground truth": dict(color="#39ff14", ls="-", lw=2.6),
    "TS-CAM baseline": dict(color="#ff3b30", ls=(0, (5, 2)), lw=2.6),
    "baseline": dict(color="#ff3b30", ls=(0, (5, 2)), lw=2.6),
    "SCM": dict(color="#00e5ff", ls=(0, (1, 1.2)), lw=1.7),
}
_OTHER_STYLES = [dict(color="#ffd60a", ls="-.", lw=2.0), dict(color="#ff4df0", ls=(0, (3, 1, 1, 1, 1, 1)), lw=2.0)]
CMAPS = {"F": "viridis", "S": "cividis", "map": "magma"}


def prefix_module(module: scm_ops.ActivationDiffusion, k: int) -> scm_ops.ActivationDiffusion:
    """A module holding the first k blocks of `module`: the same lam and beta for those
    blocks (copied, without gradient) and the same settings."""
    copy = scm_ops.ActivationDiffusion(
        module.grid_size, iterations=module.iterations[:k], alpha=module.alpha,
        lam=module.lam.detach()[:k].float().cpu(), beta=module.beta.detach()[:k].float().cpu(),
        connectivity=module.connectivity, exact_gradients=module.exact_gradients,
        implementation=module.implementation, backend=module.backend, large_p_route=module.large_p_route)
    return copy.to(module.lam.device)


@torch.no_grad()
def block_outputs(module: scm_ops.ActivationDiffusion, f0, s0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(F, S) after block 1, ..., after the last block] of `module` for f0 [H, W] or
    [B, H, W] and s0 [C, H, W] or [B, C, H, W] (arrays or tensors), computed in float32 on
    the module's device; returned on the CPU with the inputs' batch shape."""
    device = module.lam.device
    f0 = torch.as_tensor(np.asarray(f0) if not torch.is_tensor(f0) else f0, dtype=torch.float32).to(device)
    s0 = torch.as_tensor(np.asarray(s0) if not torch.is_tensor(s0) else s0, dtype=torch.float32).to(device)
    single = f0.dim() == 2
    if single:
        f0, s0 = f0[None], s0[None]
    out = []
    for k in range(1, len(module.iterations) + 1):
        f, s = prefix_module(module, k)(f0, s0)
        out.append((f[0].cpu(), s[0].cpu()) if single else (f.cpu(), s.cpu()))
    return out


def _as_image(image):
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    return img.clip(0, 1)


def _box_list(value):
    """A box (x0, y0, x1, y1), a list of boxes, or None -> a list of boxes."""
    if value is None:
        return []
    arr = np.asarray(value, dtype=np.float64)
    return [tuple(b) for b in arr.reshape(-1, 4)]


def _style(name, index):
    return BOX_STYLES.get(name, _OTHER_STYLES[index % len(_OTHER_STYLES)])


def _draw_boxes(ax, boxes: dict, styles: dict):
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle
    for name, value in sorted(boxes.items(), key=lambda item: -styles[item[0]]["lw"]):   # thinnest on top
        st = styles[name]
        for x0, y0, x1, y1 in _box_list(value):
            # pixel-inclusive boxes: the rectangle encloses pixels x0..x1, y0..y1
            ax.add_patch(Rectangle(
                (x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, ec=st["color"], ls=st["ls"],
                lw=st["lw"], path_effects=[patheffects.withStroke(linewidth=st["lw"] + 1.6, foreground="black")]))


def _wrap(title, width=18):
    """A column title on lines of about `width` characters."""
    import textwrap
    return "\n".join(textwrap.wrap(title, width, break_long_words=False)) if len(title) > width else title


def _label(names, index):
    if index is None:
        return "-"
    index = int(index)
    return str(names[index]) if names is not None and index < len(names) else str(index)


def _row_title(sample, names):
    true = _label(names, sample.get("label"))
    pred = sample.get("predicted")
    head = f"{sample['name']}\n" if sample.get("name") else ""
    if isinstance(pred, dict):
        return f"{head}true: {true}, predicted:" + "".join(f"\n  {_label(names, v)} ({k})" for k, v in pred.items())
    return f"{head}true: {true}, predicted: {_label(names, pred)}"


def render(samples, module: scm_ops.ActivationDiffusion | None = None, path: str | None = None,
           class_names=None, title: str | None = None, dpi: int = 100):
    """Draw one row per sample (see the module docstring) and return the figure; with
    `path`, save it there and close it.

    Each sample is a dict with f0 [H, W]; s0 [C, H, W]; label (the true class) and
    optionally predicted (a class, or {model name: class}), class_index (the c of S0[c]
    and F0 * S0[c], default the label), image ([H, W, 3] or [3, H, W] in [0, 1]), boxes
    ({name: (x0, y0, x1, y1) or a list of boxes}, pixel-inclusive, in image pixels),
    extra_maps, extra_f, extra_s ({title: [H, W] map}, drawn at the end of the map, F and
    S group on that group's scale) and name (a line above the row title). Without a
    module only F0, S0[c] and the maps are drawn."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    samples = list(samples)
    if not samples:
        raise ValueError("render needs at least one sample")
    blocks = len(module.iterations) if module is not None else 0
    has_image = any(s.get("image") is not None for s in samples)
    extras = {key: list(dict.fromkeys(t for s in samples for t in (s.get(key) or {})))
              for key in ("extra_f", "extra_s", "extra_maps")}
    names = list(dict.fromkeys(n for s in samples for n in (s.get("boxes") or {})))
    styles = {n: _style(n, i) for i, n in enumerate(names)}

    # columns: label [image] | F0 F1..FK (extra F) cb | gap | S0[c] (S[c]) (extra S) cb | gap | map (extras) cb;
    # a narrow gap sets the extra maps apart from the ones before them in their group
    groups = [("F", 1 + blocks, len(extras["extra_f"])),
              ("S", 2 if module is not None else 1, len(extras["extra_s"])),
              ("map", 1, len(extras["extra_maps"]))]
    widths, kinds = [1.45], [("label", 0)]
    if has_image:
        widths.append(1.0), kinds.append(("image", 0))
    for g, (key, n, n_extra) in enumerate(groups):
        for i in range(n + n_extra):
            if i == n and n_extra:
                widths.append(0.12), kinds.append(("gap", 0))
            widths.append(1.0), kinds.append((key, i))
        widths.append(0.07), kinds.append((key + "_cb", 0))
        if g < len(groups) - 1:
            widths.append(0.32), kinds.append(("gap", 0))
    panel = 1.45
    header = 1.45   # inches above the first row: title, notes, legend, two-line column titles
    footer = 0.35   # below the last row: two-line labels under the panels
    fig = plt.figure(figsize=(panel * sum(widths) + 0.3, panel * 1.2 * len(samples) + header + footer))
    gs = fig.add_gridspec(len(samples), len(widths), width_ratios=widths, left=0.1 / fig.get_figwidth(),
                          right=1 - 0.5 / fig.get_figwidth(), top=1 - header / fig.get_figheight(),
                          bottom=footer / fig.get_figheight(), wspace=0.08, hspace=0.42)
    iters = module.iterations if module is not None else ()
    f_titles = ["F0"] + [f"F after block {k + 1} (p={p})" for k, p in enumerate(iters)]
    s_titles = ["S0[c]"] + (["S[c] after the stack"] if module is not None else [])
    f_titles += extras["extra_f"]
    s_titles += extras["extra_s"]
    m_titles = ["F0 * S0[c] (inference)"] + extras["extra_maps"]
    coincide_note = False
    for r, sample in enumerate(samples):
        f0 = np.asarray(sample["f0"], dtype=np.float64)
        s0 = np.asarray(sample["s0"], dtype=np.float64)
        c = int(sample.get("class_index", sample.get("label")))
        fs = [f0]
        s_maps = [s0[c]]
        if module is not None:
            outs = block_outputs(module, f0, s0)
            fs += [f.double().numpy() for f, _ in outs]
            s_maps.append(outs[-1][1][c].double().numpy())

        def extra(key):
            given = sample.get(key) or {}
            return [np.asarray(given[t], dtype=np.float64) if t in given else None for t in extras[key]]

        fs += extra("extra_f")
        s_maps += extra("extra_s")
        maps = [f0 * s0[c]] + extra("extra_maps")
        image = _as_image(sample["image"]) if sample.get("image") is not None else None
        extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5) if image is not None else None
        boxes = sample.get("boxes") or {}
        scales = {key: (min(m.min() for m in ms if m is not None), max(m.max() for m in ms if m is not None))
                  for key, ms in (("F", fs), ("S", s_maps), ("map", maps))}
        data = {"F": fs, "S": s_maps, "map": maps}
        titles = {"F": f_titles, "S": s_titles, "map": m_titles}
        last_im = {}
        for col, (kind, i) in enumerate(kinds):
            if kind == "gap":
                continue
            ax = fig.add_subplot(gs[r, col])
            if kind == "label":
                ax.set_axis_off()
                ax.text(0.0, 0.5, _row_title(sample, class_names), transform=ax.transAxes, ha="left",
                        va="center", fontsize=8.5, linespacing=1.4)
                continue
            if kind.endswith("_cb"):
                key = kind[:-3]
                cb = fig.colorbar(last_im[key], cax=ax)
                cb.ax.tick_params(labelsize=7)
                cb.locator = MaxNLocator(4)
                cb.update_ticks()
                continue
            if kind == "image":
                if image is not None:
                    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
                    _draw_boxes(ax, boxes, styles)
                    shown = {n: _box_list(v) for n, v in boxes.items()}
                    scm_name = next((n for n in shown if n == "SCM"), None)
                    base_name = next((n for n in shown if "baseline" in n), None)
                    if scm_name and base_name and shown[scm_name] and shown[scm_name] == shown[base_name]:
                        ax.set_xlabel("baseline box = SCM box", fontsize=6.5, labelpad=1.5)
                        coincide_note = True
                else:
                    ax.set_axis_off()
                if r == 0:
                    ax.set_title("image, boxes", fontsize=8)
            else:
                m = data[kind][i]
                if m is None:
                    ax.set_axis_off()
                    continue
                lo, hi = scales[kind]
                on_image = kind == "map" and extent is not None
                im = ax.imshow(m, cmap=CMAPS[kind], vmin=lo, vmax=hi if hi > lo else lo + 1e-12,
                               interpolation="nearest", extent=extent if on_image else None)
                last_im[kind] = im
                if on_image:
                    _draw_boxes(ax, boxes, styles)
                if kind == "S":
                    ax.set_xlabel(f"{m.min():.4g} to {m.max():.4g}", fontsize=6.5, labelpad=1.5)
                elif kind == "F" and (i == 0 or i > blocks):
                    ax.set_xlabel(f"max {m.max():.3g}", fontsize=6.5, labelpad=1.5)
                elif kind == "F":
                    ax.set_xlabel(f"max {m.max():.3g}\nthis block added \u2264 {(m - data['F'][i - 1]).max():.2g}",
                                  fontsize=6.5, labelpad=1.5)
                if r == 0:
                    ax.set_title(_wrap(titles[kind][i]), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Line2D([], [], color=styles[n]["color"], ls=styles[n]["ls"], lw=styles[n]["lw"], label=f"{n} box")
               for n in names]
    notes = ["c = true class" if not any("class_index" in s for s in samples) else "c = class_index",
             "one colour scale per group and row"]
    if coincide_note:
        notes.append("identical boxes overlap: dotted over dashed")
    head = (title + "\n" if title else "") + "; ".join(notes)
    fig.text(0.5, 1 - 0.12 / fig.get_figheight(), head, ha="center", va="top", fontsize=9)
    if handles:
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 1 - (0.5 if title else 0.3) / fig.get_figheight()))
    if path is not None:
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig
