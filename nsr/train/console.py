"""What a run prints: a progress bar on a terminal, one line per epoch otherwise, a summary."""

from __future__ import annotations

import sys


def progress(show: bool, total: int, epoch: int, epochs: int, start: int):
    if not show or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                dynamic_ncols=True)


def epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f} (ce {row['ce_loss']:.4f}, "
            f"reg {row['reg_loss']:.4f})  train {row['train_acc']:.2f}%  val {row['val_acc']:.2f}%  "
            f"{row['epoch_time_s']:.1f}s")


def print_summary(m: dict, out: str) -> None:
    method = m["regularizer"]
    names = {"nsr": "NSR", "center": f"center loss (alpha {m.get('center_alpha')})"}
    kind = f"{names[method]} {dict(zip(m['regularized_layers'], m['lambda']))}" if method in names else "vanilla"
    extras = [f"{k.replace('_', ' ')} {m[k]}" for k in ("label_smoothing", "dropout") if m.get(k)]
    kind = ", ".join([kind, *extras])
    result = (f"test error {m['test_error']:.2f}% (best val {m['best_val_acc']:.2f}% at epoch "
              f"{m['best_epoch']})" if m["best_epoch"] >= 1 else "no epoch finished")
    partial = m.get("partial_epoch")
    if partial:
        result += (f"; stopped by --max-steps in epoch {partial['epoch']} at step {partial['step']}/"
                   f"{partial['of']} (val {partial['val_acc']:.2f}%, test {partial['test_acc']:.2f}% there)")
    elif m.get("stopped_by") == "max_steps":
        result += f"; stopped by --max-steps after epoch {m['epochs']}"
    if m.get("stopped_by") == "max_steps":
        result += " (continue with --resume)"
    print(f"{m['model']} {kind} on {m['dataset']}: {result}; {m['train_time_s']:.1f}s training; "
          f"outputs in {out}")
