"""A trained drafter's model card (README.md beside its weights) and its training curves."""

from __future__ import annotations

import os

CURVES_NAME = "curves.png"


def plot_curves(runs: list[tuple[str, list[dict]]], out: str, tree_budgets: tuple[int, int],
                loss_title: str = "training loss") -> None:
    """Loss, and held-out τ (chain, and trees of the two `tree_budgets`), of metrics.jsonl rows, each run
    placed after the previous one's steps. Needs matplotlib (`ddtree[bench]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_axis, tau_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    keys = (("chain_tau", "-"), *((f"tree_tau_{b}", style) for b, style in zip(tree_budgets, ("--", ":"))))
    offset = 0
    for label, rows in runs:
        steps = [offset + r["step"] for r in rows]
        line = loss_axis.plot(steps, [r["loss"] for r in rows], linewidth=1, label=label)[0]
        evaluated = [r for r in rows if "chain_tau" in r]
        x = [offset + r["step"] for r in evaluated]
        for key, style in keys:
            tau_axis.plot(x, [r[key] for r in evaluated], style, marker="o", markersize=3, color=line.get_color())
        for axis in (loss_axis, tau_axis):
            axis.axvline(offset, color="grey", linestyle="--", linewidth=0.6)
        offset = steps[-1]
    x_label = "step (runs one after another)" if len(runs) > 1 else "step"
    loss_axis.set(xlabel=x_label, ylabel="training loss", yscale="log")
    loss_axis.set_title(loss_title, fontsize=10)
    tau_axis.set(xlabel=x_label, ylabel="held-out teacher-forced τ")
    small, large = tree_budgets
    tau_axis.set_title(f"τ: chain (solid), tree B={small} (dashed), B={large} (dotted)", fontsize=10)
    loss_axis.legend(fontsize=8)
    for axis in (loss_axis, tau_axis):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_model_card(drafter_dir: str, facts: dict, metrics: list[dict], tree_budgets: tuple[int, ...]) -> str:
    """DRAFTER_DIR/README.md from the run's `facts` (target, data, steps, times, device, command) and its
    metrics rows; the curves beside it when matplotlib is installed. Returns the card's path."""
    final = [r for r in metrics if "chain_tau" in r][-1]
    try:
        plot_curves([("training", metrics)], os.path.join(drafter_dir, CURVES_NAME),
                     (min(tree_budgets), max(tree_budgets)))
        curves = f"![loss and held-out τ over the steps]({CURVES_NAME})"
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        curves = "No curves: matplotlib is not installed (`pip install 'ddtree[bench]'`); metrics.jsonl holds them."
    taus = ", ".join(f"tree B={key.rsplit('_', 1)[1]} {final[key]:.2f}" for key in final if key.startswith("tree_tau_"))
    path = os.path.join(drafter_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""# DFlash drafter for {facts['target']}

Trained by `ddtree train-drafter`; load it with `ddtree generate --target {facts['target_spec']} --drafter {drafter_dir}`.

- **Command:** `{facts['command']}`
- **Drafter:** {facts['drafter']}
- **Data:** {facts['prompts']}; greedy answers (temperature 0): {facts['greedy']}; sampled answers
  (temperature 1): {facts['sampled']}
- **Training:** {final['step']} steps ({facts['config']})
- **Wall time:** {facts['wall_time']}
- **Device:** {facts['device']}
- **Final loss:** {final['loss']:.4f} (top-1 {final['top1']:.3f})
- **Held-out teacher-forced τ** ({final['anchors']} anchors): chain {final['chain_tau']:.2f}, {taus}

τ is the mean accepted length per round (drafted tokens accepted plus the target's own) if the target's
continuation is the held-out answer; decoding measures it for real with `ddtree bench`.

{curves}
""")
    return path
