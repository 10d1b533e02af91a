"""``analyze``: load the data and the model once, run the selected instruments, write
``analysis.json``.  An instrument that fails records its error and the others still run."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from vitlab.analysis import instruments
from vitlab.analysis.data import Data, fit_images, load_data, normalize
from vitlab.analysis.instruments import budget
from vitlab.analysis.instruments.common import num_classes, progress
from vitlab.analysis.loading import build_model, checkpoint_geometry, read_checkpoint
from vitlab.errors import UserError

__all__ = ["analyze"]


def _checkpoint_data(args):
    """(data set named by the checkpoint's config or None, its geometry or None)."""
    if not args.checkpoint:
        return None, None
    ckpt = read_checkpoint(args.checkpoint)
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return (cfg.get("data") if isinstance(cfg.get("data"), str) else None), checkpoint_geometry(ckpt)


def _set_normalization(model, data: Data, info: Dict[str, Any], geo: Optional[Dict[str, Any]]) -> None:
    """A trained checkpoint's own mean/std (what ``vitlab eval`` uses), else the model's default."""
    norm = geo if geo else model.default_cfg
    data.mean, data.std = norm.get("mean"), norm.get("std")
    if geo and tuple(model.default_cfg["input_size"]) != (geo["in_chans"], geo["img_size"], geo["img_size"]):
        raise UserError(f"model {info['model']} takes input {tuple(model.default_cfg['input_size'])} but the "
                        f"checkpoint was trained at {(geo['in_chans'], geo['img_size'], geo['img_size'])}")
    info["normalization"] = {"mean": list(data.mean or []), "std": list(data.std or []),
                             "source": "checkpoint" if geo else "model default_cfg"}


def _weight_decay(info: Dict[str, Any]) -> float:
    cc = info.get("checkpoint_config", {})
    wd = cc.get("weight_decay")
    if wd is None and isinstance(cc.get("optimizer"), dict):
        wd = cc["optimizer"].get("weight_decay")
    return float(wd) if isinstance(wd, (int, float)) else 0.0


def _fit(model, data: Data) -> List[str]:
    """Images to the model's input (channels, size) for a model without a checkpoint geometry."""
    cfg = model.default_cfg
    notes = list(data.notes)
    for attr in ("train_x", "eval_x"):
        fitted, note = fit_images(getattr(data, attr), cfg["input_size"])
        setattr(data, attr, fitted)
        if note and attr == "eval_x":
            notes.append(f"images adapted to the model input {tuple(cfg['input_size'])}: {note}")
    return notes


def _prepare(args):
    """(data, model, info, data spec, notes) for ``args``."""
    ckpt_data, geo = _checkpoint_data(args)
    spec = args.data or ckpt_data or "mnist"
    a = _full_sizes(args)  # the budget only ever shrinks these
    n_train = max(a.landscape_images + a.hessian_batches * a.hessian_batch_size, 1)
    n_eval = max(a.num_images, a.calibration_images, a.robustness_images, a.attention_images, a.lipschitz_images)
    data = load_data(spec, n_train, n_eval, args.seed, geometry=geo)
    model, info = build_model(args, data.num_classes)
    _set_normalization(model, data, info, geo)
    if args.weight_decay is None:
        args.weight_decay = _weight_decay(info)
    notes = _fit(model, data)
    if data.num_classes > num_classes(model, data):
        raise ValueError(f"data has {data.num_classes} classes but the model has {num_classes(model, data)} outputs")
    return data, model, info, spec, notes


def _precision(module, amp: str) -> Tuple[Any, Dict[str, str]]:
    """(autocast context, what analysis.json records) for one instrument module under the resolved
    ``amp``: instruments with a ``FLOAT32`` reason run in float32 whatever ``amp`` says."""
    from vitlab.engine.amp import autocast

    reason = getattr(module, "FLOAT32", None)
    if amp == "none" or reason:
        rec = {"dtype": "float32"}
        if reason and amp != "none":
            rec["note"] = f"float32 although --amp is {amp}: {reason}"
        return contextlib.nullcontext(), rec
    return autocast(amp, torch.device("cpu")), {"dtype": "bfloat16", "autocast": amp}


def _full_sizes(args) -> argparse.Namespace:
    """``args`` with every size not given (nor chosen by the budget) at its full default."""
    for m in instruments.modules():
        args = budget.full(args, m.SIZES)
    return args


def _plan(jobs: List[str], model, data: Data, args, amp: str):
    """Choose the sizes the user did not give, for each selected instrument's share of ``--budget``
    (printed; recorded as ``meta.budget``); sets them on ``args``.  Returns the record and
    ``replan(job, slowdown)``, which chooses ``job``'s sizes again for its share over ``slowdown``."""
    mods = instruments.by_key()
    given = {j: budget.user_sizes(args, mods[j].SIZES) for j in jobs}  # before any choice is set on args
    need = [j for j in jobs if len(given[j]) < len(mods[j].SIZES)]
    info: Dict[str, Any] = {"seconds": args.budget, "instruments": {}}
    if not need or not 0 < args.budget < math.inf:
        return info, None
    timer = budget.PassTimer(model, normalize(data.eval_x[:2], data.norm), data.eval_y[:2])
    weights = sum(mods[j].WEIGHT for j in jobs)

    def plan(j: str, on, slowdown: float = 1.0) -> Dict[str, Any]:
        share = args.budget * mods[j].WEIGHT / weights
        return budget.plan_instrument(mods[j], on, data, timer, lambda: _precision(mods[j], amp)[0],
                                      _precision(mods[j], amp)[1]["dtype"], share / slowdown, given[j])
    for j in need:
        try:
            info["instruments"][j] = plan(j, args)
        except (ValueError, RuntimeError, AttributeError, NotImplementedError) as exc:
            info["instruments"][j] = {"share_s": args.budget * mods[j].WEIGHT / weights,
                                      "note": f"not timed ({exc}); full default sizes"}
    info["probe_seconds"] = timer.spent
    info["seconds_per_image"] = {f"{k} ({d})": v for (k, d), v in timer.cache.items()}
    rates = ", ".join(f"{k} {v:.3g} s" for k, v in info["seconds_per_image"].items())
    print(f"vitlab analyze: budget {args.budget:g} s over {len(jobs)} instruments (shares by weight); timed passes "
          f"({timer.spent:.1f} s), per image: {rates}", file=sys.stderr)
    for j, p in info["instruments"].items():
        what = p.get("note") or (f"{p['options']} (estimated {p['estimate_s']:.0f} s"
                                 + (")" if p["fits"] else "; the smallest sizes, over the share)"))
        print(f"  budget {j}: {p['share_s']:.0f} s share -> {what}", file=sys.stderr)

    def replan(j: str, run_args, slowdown: float) -> None:
        old = info["instruments"].get(j)
        if not old or "sizes" not in old:
            return
        trial = argparse.Namespace(**vars(run_args))
        new = plan(j, trial, slowdown)
        if new["sizes"] != old["sizes"]:
            for k in new["sizes"]:
                setattr(run_args, k, getattr(trial, k))
            old["replanned"] = dict(new, slowdown=slowdown)
            print(f"  budget {j}: the instruments so far took {slowdown:.1f}x their estimates -> {new['options']} "
                  f"(estimated {new['estimate_s']:.0f} s at the timed rate)", file=sys.stderr)
    return info, replan


def _slowdown(result: Dict[str, Any], budget_s: float) -> float:
    """Actual / estimated time of the planned instruments run so far, when they overran by more than a
    tenth of the budget (else 1): a machine that got busier after the timing."""
    planned = result["meta"]["budget"]["instruments"]
    done = [j for j in result["timings"] if "estimate_s" in planned.get(j, {})]
    spent = sum(result["timings"][j] for j in done)
    est = sum(planned[j].get("replanned", planned[j])["estimate_s"] for j in done)
    return spent / est if est > 0 and spent - est > 0.1 * budget_s else 1.0


def _run_jobs(jobs: List[str], model, data: Data, args, out_dir: str, result: Dict[str, Any], label: str,
              replan=None) -> None:
    runners = instruments.by_key()
    it = jobs
    if progress(args):
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc=f"analyze {label}")
    planned = result["meta"]["budget"]["instruments"]
    for job in it:
        t0 = time.perf_counter()
        ctx, result["precision"][job] = _precision(runners[job], result["meta"]["amp"])
        try:
            slow = _slowdown(result, args.budget)
            if replan and slow > 1.0:
                replan(job, args, slow)
            est = planned.get(job, {}).get("replanned", planned.get(job, {})).get("estimate_s")
            print(f"  {job}: {runners[job].cost_line(args, data, model)}"
                  + (f"; estimated {est:.0f} s" if est is not None else ""), file=sys.stderr)
            with ctx:
                result[job] = runners[job].run(model, data, args, out_dir)
        except (ValueError, RuntimeError) as exc:
            if args.traceback:
                raise
            print(f"vitlab analyze: {job} failed: {exc}", file=sys.stderr)
            result[job] = {"error": f"{type(exc).__name__}: {exc}"}
        result["timings"][job] = time.perf_counter() - t0


def analyze(args, out_dir: str, label: Optional[str] = None) -> Dict:
    """Run the selected instruments; write PNGs and ``analysis.json`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    args = argparse.Namespace(**vars(args))  # the budget sets sizes on this copy
    jobs = instruments.selected_keys(args.only, args.skip)
    if not jobs:
        raise UserError("no instrument selected (check --only / --skip)")
    data, model, info, spec, notes = _prepare(args)
    from vitlab.engine.amp import resolve_amp
    amp = resolve_amp(getattr(args, "amp", "none"), torch.device("cpu"), model)
    if not label:
        label = os.path.splitext(os.path.basename(args.checkpoint))[0] if args.checkpoint else info["model"]
    result: Dict[str, Any] = {"label": label, "meta": {**info, "data": spec, "data_notes": notes, "seed": args.seed,
                                                       "weight_decay": args.weight_decay, "l2": args.l2,
                                                       "torch": torch.__version__,
                                                       "threads": torch.get_num_threads(), "amp": amp,
                                                       "amp_requested": getattr(args, "amp", "none")},
                              "precision": {}, "timings": {}}
    result["meta"]["budget"], replan = _plan(jobs, model, data, args, amp)
    args = _full_sizes(args)
    _run_jobs(jobs, model, data, args, out_dir, result, label, replan)
    from vitlab.analysis.report import write_json
    write_json(result, os.path.join(out_dir, "analysis.json"))
    return result
