"""Good defaults on unseen data: `vitlab train --data DIR` with no other flag vs vit-pytorch's ViT, same wall time.

    python benchmarks/defaults.py                   # cifar10k and digits, one round (tens of minutes on 2 cores)
    python benchmarks/defaults.py --rounds 3        # vitlab/peer, peer/vitlab, vitlab/peer
    python benchmarks/defaults.py --quick           # smoke run: 1,000 images, 1 epoch; prints, writes nothing

Issue 17, point 8: ``vitlab train --data DIR`` chooses its model and recipe from the data (image size,
channels, images, classes) and should match or beat the README ViT of vit-pytorch ("An Image is Worth 16x16
Words: Transformers for Image Recognition at Scale", Dosovitskiy et al., ICLR 2021, as written by
lucidrains/vit-pytorch) trained with AdamW ("Decoupled Weight Decay Regularization", Loshchilov and Hutter,
ICLR 2019) and the one-cycle schedule ("Super-Convergence", Smith and Topin, 2019) for the same wall time.

Data: ``cifar10k``, the first 1,000 files (sorted names) of each class of ../shared/data/cifar10/train as a
folder of symlinks under ``--cache``, tested on the real val split (or a stratified ``--val-images`` subset);
``digits``, vitlab's bundled 4,000 / 1,000 split.  The peer reads the same images through ``vitlab.data``.
vitlab runs as a subprocess with no flag but ``--data``, ``--out`` and ``--no-progress`` (``--quick`` adds
``--epochs 1``); its training time is the sum of its epochs' step loops (``metrics.jsonl``), evaluation
excluded.  The peer times 20 steps, fits its one-cycle schedule into the rest of that time and stops there,
with vitlab's torch thread count and loader workers.  Writes the 'defaults' section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (sets sys.path for an uninstalled checkout)

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = C.HERE.parent
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
CACHE = C.HERE / ".cache" / "defaults"
TITLE = "Defaults on unseen data: `vitlab train --data DIR` vs vit-pytorch's ViT, same training time"
TIMING_STEPS = 20
PEER_MODEL = dict(patch_size=4, dim=128, depth=6, heads=8, mlp_dim=256, dropout=0.1, emb_dropout=0.1)
PEER_OPT = dict(lr=1e-3, weight_decay=0.05, batch_size=64, max_lr=3e-3, smoothing=0.1)
DIV_FACTOR = 25.0  # OneCycleLR's default: it starts at max_lr / 25


# --- data ----------------------------------------------------------------------------------------------

def image_files(folder: Path) -> List[str]:
    from vitlab.data.folder_info import IMG_EXTENSIONS

    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)  # a tree of links: rmtree unlinks them, it never follows them


def build_subset(source: Path, dest: Path, per_class: int) -> Dict[str, List[str]]:
    """``dest/<class>/<file>`` symlinks to the first ``per_class`` files (sorted names) of each class folder of
    ``source``; ``dest`` is rebuilt from scratch (it holds only links).  Returns class -> file names."""
    source, dest = Path(source).resolve(), Path(dest)
    classes = sorted(e.name for e in os.scandir(source) if e.is_dir()) if source.is_dir() else []
    if not classes:
        raise ValueError(f"no class folders in {source}: expected {source}/<class>/<image files>")
    if per_class < 1:
        raise ValueError(f"images per class must be >= 1, got {per_class}")
    chosen = {}
    for c in classes:
        files = image_files(source / c)
        if len(files) < per_class:
            raise ValueError(f"{source / c} holds {len(files)} images, fewer than the {per_class} per class asked")
        chosen[c] = files[:per_class]
    _remove(dest)
    for c, files in chosen.items():
        (dest / c).mkdir(parents=True)
        for f in files:
            os.symlink(source / c / f, dest / c / f)
    return chosen


def prepare_cifar(source: Path, cache: Path, images: int, val_images: Optional[int]) -> Path:
    """The ``cifar10k`` folder: ``train/`` = ``images`` / 10 per class, ``val/`` = a link to the real val split
    or ``val_images`` / 10 per class of it."""
    if images % 10 or (val_images is not None and val_images % 10):
        raise ValueError(f"--images {images} and --val-images {val_images} must be multiples of the 10 classes")
    root = Path(cache) / f"cifar10_{images}_val{val_images or 'all'}"
    build_subset(Path(source) / "train", root / "train", images // 10)
    if val_images:
        build_subset(Path(source) / "val", root / "val", val_images // 10)
    else:
        _remove(root / "val")
        os.symlink(Path(source, "val").resolve(), root / "val")
    return root


# --- vitlab side ---------------------------------------------------------------------------------------

def vitlab_command(data: Optional[str], out: Path, quick: bool) -> List[str]:
    """``vitlab train`` with no flag but the data, the run directory and --no-progress (--epochs 1 if quick)."""
    cmd = [sys.executable, "-m", "vitlab", "train"] + (["--data", data] if data else [])
    return cmd + ["--out", str(out), "--no-progress"] + (["--epochs", "1"] if quick else [])


def read_run(out: Path) -> Dict:
    """What a finished run directory says: test top-1, training seconds (its epochs' step loops), images seen,
    the model it chose (with its parameter count) and the settings the peer copies (threads, workers, device)."""
    import yaml

    import vitlab

    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    model = json.loads((out / "config.json").read_text())
    with torch.device("meta"):  # parameter count only: no memory, no init
        params = sum(p.numel() for p in vitlab.create_model(model["architecture"], **model["model_args"]).parameters())
    res, kw = cfg["resolved"], model["model_args"]
    return dict(top1=summary["top1"], train_s=sum(e["epoch_seconds"] for e in epochs),
                images=sum(round(e["images_per_second"] * e["epoch_seconds"]) for e in epochs),
                epochs=len(epochs), steps=summary["steps"], amp=summary["amp"], params=params,
                model=f"{model['architecture']} (dim {kw.get('embed_dim', '?')}, depth {kw.get('depth', '?')}, "
                      f"patch {kw.get('patch_size', '?')})",
                recipe=f"{cfg['epochs']} epoch{'s' * (cfg['epochs'] != 1)}, batch {res['global_batch']}, "
                       f"lr {res['lr']:.3g}, {cfg['opt']} + {cfg['sched']}, amp {summary['amp']}",
                threads=cfg.get("threads"), workers=int(cfg.get("workers") or 0), device=res.get("device", "cpu"))


def run_vitlab(data: Optional[str], out: Path, quick: bool) -> Dict:
    cmd = vitlab_command(data, out, quick)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    Path(f"{out}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return dict(read_run(out), wall_s=wall)


# --- peer: vit-pytorch's README ViT, AdamW + one-cycle, for a time budget (a plain baseline) ------------

class _Transformed(Dataset):
    def __init__(self, ds: Dataset, tf: Callable, mode: str):
        self.ds, self.tf, self.mode = ds, tf, mode

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, target = self.ds[i]
        return self.tf(img.convert(self.mode)), target


def peer_transforms(kind: str, size: int, mean, std):
    """The usual augmentation: CIFAR crop with 4 px padding + flips; digits small affine moves."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if kind == "digits":
        aug = [T.RandomAffine(10, translate=(2 / 28, 2 / 28), scale=(0.9, 1.1))]
    else:
        aug = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
    return T.Compose(aug + norm), T.Compose(norm)


def schedule_length(elapsed_s: float, step_s: float, budget_s: float) -> int:
    """One-cycle steps that fit in what is left of the budget after ``elapsed_s``, at ``step_s`` a step."""
    if step_s <= 0:
        raise ValueError(f"step time must be > 0 s, got {step_s}")
    return max(0, math.floor((budget_s - elapsed_s) / step_s + 1e-6))


def train_peer(model: nn.Module, loader, budget_s: float, device: torch.device,
               clock: Callable[[], float] = time.perf_counter, timing_steps: int = TIMING_STEPS) -> Dict:
    """Train until ``budget_s`` (clock read once before and once after each step).  The first ``timing_steps``
    run at the one-cycle's starting lr and give the step time; OneCycleLR then spans the steps that fit in the
    rest of the budget, so it ends at the budget; training stops at the budget or the schedule's end."""
    opt = torch.optim.AdamW(model.parameters(), lr=PEER_OPT["lr"], weight_decay=PEER_OPT["weight_decay"])
    for g in opt.param_groups:  # the timing steps: one-cycle's first lr, the schedule is not known yet
        g["lr"] = PEER_OPT["max_lr"] / DIV_FACTOR
    criterion = nn.CrossEntropyLoss(label_smoothing=PEER_OPT["smoothing"])
    sched, planned, steps, images, lr_last, first = None, None, 0, 0, 0.0, 0.0
    if len(loader) == 0:
        raise ValueError(f"no full training batch: fewer images than the peer's batch of {PEER_OPT['batch_size']}")
    model.train()
    t0 = clock()
    while True:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr_last = opt.param_groups[0]["lr"]
            opt.step()
            if sched is not None:
                sched.step()
            steps, images = steps + 1, images + len(y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = clock() - t0
            first = now if steps == 1 else first
            if steps == timing_steps:  # the first step's loader start-up is left out of the step time
                n = schedule_length(now, (now - first) / max(1, timing_steps - 1), budget_s)
                planned = steps + n
                if n > 0:
                    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PEER_OPT["max_lr"], total_steps=n,
                                                                div_factor=DIV_FACTOR)
            if now >= budget_s or (planned is not None and steps >= planned):
                return dict(steps=steps, planned=planned, images=images, train_s=now, lr_last=lr_last)


@torch.no_grad()
def evaluate_peer(model: nn.Module, loader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(-1).cpu() == y).sum())
        total += len(y)
    return 100.0 * correct / max(1, total)


def run_peer(spec: Dict, budget_s: float, like: Dict, threads0: int, seed: int) -> Dict:
    """Build the peer for the data of ``spec``, train it for ``budget_s`` with the threads and loader workers of
    the vitlab run ``like`` and return its test top-1."""
    from vit_pytorch import ViT

    from vitlab.data import build_dataset_pair
    from vitlab.runtime import set_threads

    torch.set_num_threads(threads0)
    set_threads(like["threads"], like["workers"])  # vitlab's own rule, so the thread count is the same
    device = torch.device(like["device"])
    train_set, val_set, classes = build_dataset_pair(spec["data"])
    train_tf, eval_tf = peer_transforms(spec["kind"], spec["size"], spec["mean"], spec["std"])
    mode = "L" if spec["chans"] == 1 else "RGB"
    w = like["workers"]
    train_loader = DataLoader(_Transformed(train_set, train_tf, mode), batch_size=PEER_OPT["batch_size"],
                              shuffle=True, drop_last=True, num_workers=w)
    val_loader = DataLoader(_Transformed(val_set, eval_tf, mode), batch_size=256, num_workers=w)
    torch.manual_seed(seed)
    model = ViT(image_size=spec["size"], num_classes=len(classes), channels=spec["chans"], **PEER_MODEL).to(device)
    t0 = time.perf_counter()
    out = train_peer(model, train_loader, budget_s, device)
    top1 = evaluate_peer(model, val_loader, device)
    return dict(out, top1=top1, budget_s=budget_s, wall_s=time.perf_counter() - t0, threads=torch.get_num_threads(),
                params=sum(p.numel() for p in model.parameters()), workers=w,
                model="vit_pytorch.ViT (dim {dim}, depth {depth}, patch {patch_size})".format(**PEER_MODEL))


# --- the benchmark -------------------------------------------------------------------------------------

def data_specs(args) -> List[Dict]:
    from vitlab.constants import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD
    from vitlab.data import build_dataset_pair, dataset_info

    specs = []
    for name in args.data:
        if name == "cifar10k":
            if not Path(args.cifar, "train").is_dir():
                print(f"cifar10k skipped: no {args.cifar}/train (ImageFolder of CIFAR-10)")
                continue
            root = str(prepare_cifar(Path(args.cifar), Path(args.cache), args.images, args.val_images))
            spec = dict(name=name, data=root, arg=root, kind="cifar", mean=CIFAR10_MEAN, std=CIFAR10_STD)
        else:
            spec = dict(name=name, data="digits", arg=None, kind="digits", mean=MNIST_MEAN, std=MNIST_STD)
        info = dataset_info(spec["data"])
        tr, va, classes = build_dataset_pair(spec["data"])
        specs.append(dict(spec, size=int(info["img_size"]), chans=int(info["in_chans"]), n_train=len(tr),
                          n_val=len(va), classes=len(classes)))
    return specs


def run_round(r: int, spec: Dict, args, last_vitlab: Dict[str, Dict], threads0: int) -> List[Dict]:
    """Round ``r`` on one data set: vitlab then the peer in even rounds, the peer first in odd ones."""
    out = Path(args.cache) / "runs" / f"{spec['name']}-r{r}"
    rows: Dict[str, Dict] = {}
    order = ("vitlab", "peer") if r % 2 == 0 else ("peer", "vitlab")
    for side in order:
        print(f"round {r + 1}, {spec['name']}: {side} ...", flush=True)
        if side == "vitlab":
            rows[side] = last_vitlab[spec["name"]] = run_vitlab(spec["arg"], out, args.quick)
        else:  # budget, threads and workers of this round's vitlab run, or of the previous round's if first
            like = last_vitlab[spec["name"]]
            rows[side] = run_peer(spec, like["train_s"], like, threads0, args.seed)
        print(f"  top-1 {rows[side]['top1']:.2f}%, {rows[side]['train_s']:.1f} s training, "
              f"{rows[side]['images']} images", flush=True)
    return [dict(rows[s], round=r + 1, data=spec["name"], side=s, order="/".join(order)) for s in ("vitlab", "peer")]


def report(specs: List[Dict], results: List[Dict], head: str) -> str:
    data_rows = [[s["name"], f"{s['n_train']:,} / {s['n_val']:,}", f"{s['chans']} x {s['size']} x {s['size']}",
                  s["classes"], next((r["model"] + "; " + r["recipe"] for r in results
                                      if r["data"] == s["name"] and r["side"] == "vitlab"), "")] for s in specs]
    rows = [[r["round"], r["data"], r["order"], r["side"], f"{r['model']}, {r['params'] / 1e6:.2f} M",
             f"{r['train_s']:.1f}", f"{r['wall_s']:.1f}", f"{r['images']:,}",
             f"{r['images'] / max(r['train_s'], 1e-9):.0f}", f"{r['top1']:.2f}"] for r in results]
    means = []
    for s in specs:
        v = [r for r in results if r["data"] == s["name"] and r["side"] == "vitlab"]
        p = [r for r in results if r["data"] == s["name"] and r["side"] == "peer"]
        mv, mp = statistics.mean(r["top1"] for r in v), statistics.mean(r["top1"] for r in p)
        wins = sum(a["top1"] >= b["top1"] for a, b in zip(v, p))
        means.append([s["name"], f"**{mv:.2f}**", f"**{mp:.2f}**", f"{mv - mp:+.2f}", f"{mv / max(mp, 1e-9):.3f}",
                      f"{sum(r['train_s'] for r in p) / sum(r['train_s'] for r in v):.3f}",
                      f"{sum(r['images'] for r in v) / max(1, sum(r['images'] for r in p)):.2f}",
                      f"{wins}/{len(v)}"])
    return (head + "\n### Data and what vitlab chose\n\n"
            + C.table(["data", "train / test images", "input", "classes", "vitlab's model and recipe"], data_rows)
            + "\n\n### Per round\n\n"
            + C.table(["round", "data", "order", "side", "model, params", "train s", "wall s", "images seen", "img/s",
                       "test top-1 %"], rows)
            + "\n\n### Means over rounds\n\n"
            + C.table(["data", "vitlab top-1 %", "peer top-1 %", "vitlab - peer", "vitlab / peer top-1",
                       "peer / vitlab train time", "vitlab / peer images seen", "vitlab >= peer"], means) + "\n")


def header(args, specs: List[Dict], started: str, load0: str, results: List[Dict]) -> str:
    peer = next((r for r in results if r["side"] == "peer"), {})
    device = next((r["device"] for r in results if r["side"] == "vitlab"), "cpu")
    aug = "; ".join(f"{s['name']}: " + ("RandomAffine(10, translate 2/28, scale 0.9-1.1)" if s["kind"] == "digits"
                                         else "RandomCrop(32, padding 4) + horizontal flip") for s in specs)
    return (f"Command: `{C.command_line()}`  \n"
            f"Run: {started}; machine: {C.machine(device)}  \n"
            f"Load average (1, 5, 15 min) before: {load0}; after: {C.loadavg()}  \n"
            f"vitlab: `{' '.join(['vitlab', 'train'] + vitlab_command('DIR', Path('RUN'), args.quick)[4:])}` "
            "(digits: without `--data`), nothing else; training time = its epochs' step loops (`metrics.jsonl` "
            "`epoch_seconds`), evaluation excluded; 'wall s' is the whole process (start-up, data scan, evaluation, "
            "files), for the peer training + evaluation.  \n"
            f"Peer: vit-pytorch `ViT(patch_size=4, dim=128, depth=6, heads=8, mlp_dim=256, dropout=0.1, "
            f"emb_dropout=0.1)` at the data's size and channels, float32; AdamW (lr 1e-3, weight decay 0.05), batch "
            f"64, label smoothing 0.1; {TIMING_STEPS} timed steps at one-cycle's first lr, then "
            f"`OneCycleLR(max_lr=3e-3)` over the steps that fit in the rest of vitlab's training time, stopped at it; "
            f"augmentation {aug}; normalised with the data's mean/std; {peer.get('threads', '?')} torch threads and "
            f"{peer.get('workers', '?')} loader workers, as vitlab's run; seed {args.seed}.  \n"
            f"Rounds alternate the order (vitlab/peer, then peer/vitlab with the previous round's vitlab time as "
            f"the budget, ...); both are tested on the same test images.  CIFAR-10 here is the JPEG copy in "
            f"shared/data (quality 75): accuracies are close to, not equal to, those on the original arrays.\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["cifar10k", "digits"], choices=["cifar10k", "digits"])
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per data set (default 1)")
    p.add_argument("--images", type=int, default=None, help="cifar10k training images (default 10000; quick 1000)")
    p.add_argument("--val-images", type=int, default=None,
                   help="cifar10k test images, stratified (default: the whole val split; quick 1000)")
    p.add_argument("--cifar", default=str(CIFAR), help=f"CIFAR-10 ImageFolder root (default {CIFAR})")
    p.add_argument("--cache", default=str(CACHE), help="subset links and run directories "
                   "(default benchmarks/.cache/defaults)")
    p.add_argument("--seed", type=int, default=0, help="the peer's seed (default 0)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1,000 images, vitlab --epochs 1; no RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    args.images = args.images or (1000 if args.quick else 10000)
    args.val_images = args.val_images or (1000 if args.quick else None)
    args.no_write = args.no_write or args.quick
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads0 = torch.get_num_threads()
    C.tune_cpu_allocator()  # as `vitlab train` does in its own process
    started, load0 = C.now(), C.loadavg()
    print(f"load average: {load0}")
    specs = data_specs(args)
    results: List[Dict] = []
    last_vitlab: Dict[str, Dict] = {}
    for r in range(args.rounds):
        for spec in specs:
            results += run_round(r, spec, args, last_vitlab, threads0)
    publish(args, report(specs, results, header(args, specs, started, load0, results)))
    return 0


def publish(args, body: str) -> None:
    """Print ``body``; unless ``--no-write`` (or ``--quick``), replace the 'defaults' section of RESULTS.md."""
    print(body)
    if not args.no_write:
        C.update_results("defaults", TITLE, body)


if __name__ == "__main__":
    raise SystemExit(main())
