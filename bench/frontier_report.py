"""Statistics, tables and plots of the frontier bench (bench/frontier.py): per cell (size, loss, switch, N)
the mean over seeds with a 95% t confidence interval, the gold reward at a matched KL (interpolated along
each run's checkpoints), Welch t-tests against N = 0 and against online DPO, the ablation of the
off-policy switches, and the frontier plot (gold vs KL per N per loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from scipy import stats


def ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval); half-width nan with fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided Welch t-test p-value (nan when a side has fewer than 2 values or no spread)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def gold_at_kl(curve: list[dict], kappa: float) -> float:
    """Gold reward where the run's KL first reaches kappa (linear between checkpoints); nan if never."""
    for before, after in zip(curve, curve[1:]):
        if after["kl"] >= kappa > before["kl"] or (after["kl"] >= kappa and before["kl"] >= kappa):
            if after["kl"] == before["kl"]:
                return after["gold"]
            frac = min(max((kappa - before["kl"]) / (after["kl"] - before["kl"]), 0.0), 1.0)
            return before["gold"] + frac * (after["gold"] - before["gold"])
    return math.nan


def cells(runs: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault((r["size"], r["loss"], r["switch"], r["n"]), []).append(r)
    return out


def matched_kl(runs: list[dict], by_loss: bool = False) -> dict:
    """The largest KL every default-switch run reaches (min over runs of the max KL of its curve), per
    size, or per (size, loss) with by_loss."""
    out: dict = {}
    for r in runs:
        if r["switch"] == "default":
            key = (r["size"], r["loss"]) if by_loss else r["size"]
            out[key] = min(out.get(key, math.inf), max(c["kl"] for c in r["curve"]))
    return out


def _at(runs: list[dict], kappa: float) -> tuple[float, float]:
    values = [gold_at_kl(r["curve"], kappa) for r in runs]
    values = [v for v in values if v == v]
    return ci(values) if values else (math.nan, math.nan)


def summarise(report: dict) -> list[dict]:
    """One row per cell: final gold/KL/proxy and matched-KL gold (mean, CI), p-values."""
    runs, kappa, own = report["runs"], matched_kl(report["runs"]), matched_kl(report["runs"], by_loss=True)
    grouped = cells(runs)
    rows = []
    for (size, loss, switch, n), rs in sorted(grouped.items()):
        gold = [r["curve"][-1]["gold"] for r in rs]
        base = grouped.get((size, loss, "default", 0), [])
        base_gold = [r["curve"][-1]["gold"] for r in base]
        dpo = grouped.get((size, "online-dpo", "default", n), [])
        row = {"size": size, "loss": loss, "switch": switch, "N": n, "seeds": [r["seed"] for r in rs],
               "lr": rs[0]["lr"], "gold": ci(gold), "gold_values": gold,
               "kl": ci([r["curve"][-1]["kl"] for r in rs]), "proxy": ci([r["curve"][-1]["proxy"] for r in rs]),
               "matched_kl": kappa[size], "gold_at_matched_kl": _at(rs, kappa[size]),
               "loss_matched_kl": own.get((size, loss), math.nan),
               "gold_at_loss_matched_kl": _at(rs, own.get((size, loss), math.nan)),
               "p_vs_N0": welch_p(gold, base_gold) if n else math.nan,
               "p_vs_online_dpo": welch_p(gold, [r["curve"][-1]["gold"] for r in dpo]) if loss != "online-dpo"
               else math.nan}
        if switch != "default":
            same = grouped.get((size, loss, "default", n), [])
            row["p_vs_default_switch"] = welch_p(gold, [r["curve"][-1]["gold"] for r in same])
        rows.append(row)
    return rows


def fmt(pair, digits=3) -> str:
    mean, half = pair
    if mean != mean:
        return "-"
    return f"{mean:.{digits}f}" + ("" if half != half else f" ± {half:.{digits}f}")


def fp(p: float) -> str:
    return "-" if p != p else f"{p:.3f}"


def _table(rows: list[dict], switch: str, cell) -> list[str]:
    ns = sorted({r["N"] for r in rows if r["switch"] == switch})
    out = ["| size | loss | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
    keys = list(dict.fromkeys((r["size"], r["loss"]) for r in rows if r["switch"] == switch))
    by = {(r["size"], r["loss"], r["N"]): r for r in rows if r["switch"] == switch}
    for size, loss in keys:
        out.append(f"| {size} | {loss} | " + " | ".join(
            cell(by[(size, loss, n)]) if (size, loss, n) in by else "" for n in ns) + " |")
    return out


def markdown(report: dict, rows: list[dict]) -> str:
    g = report["grid"]
    episodes = g["steps"] * g["prompts"] * report["K"]
    out = [f"# Reward-KL frontier under staleness ({report['command']})", "",
           f"Commit {report['code']['commit'][:12]}"
           + (" (with uncommitted changes to the bench or losses)" if report["code"]["relevant_files_modified"]
              else "") + f"; {report['seconds'] / 60:.1f} min on this machine.", "",
           f"{g['steps']} steps x {g['prompts']} prompts x K={report['K']} = {episodes} episodes per run; exact lag N "
           f"(the batch of step i is sampled by version i-N); β = c_KL = {report['beta']} for every loss; seeds "
           f"{list(g['seeds'])}; checkpoints every {g['eval_every']} steps on {g['eval_prompts']} fresh samples.", ""]
    for size, t in report["tasks"].items():
        out.append(f"- {size}: {t['parameters']:,} parameters; proxy RM held-out pairwise accuracy "
                   f"{t['proxy_pairwise_accuracy_heldout']:.3f} ({t['proxy_pairs']} gold-labelled pairs); "
                   f"reference gold {t['reference_gold_mean']:.3f}")
    how = ("probed at N=0, seed 0, on " + ", ".join(f"{lr:g}" for lr in report["lr_grid"]) + "; best final gold"
           if report["lr_probes"] else "fixed on the command line, not probed")
    lrs = report["lrs"]  # {size: {loss: lr}}; a flat {loss: lr} in reports before the per-size probe
    per_size = lrs if all(isinstance(v, dict) for v in lrs.values()) else {"every size": lrs}
    out += ["", f"Learning rates ({how}): " + "; ".join(
        f"{size}: " + ", ".join(f"{k} {v:g}" for k, v in chosen.items()) for size, chosen in per_size.items()), ""]
    for p in report["lr_probes"]:
        out.append(f"- {p['size']} {p['loss']} lr {p['lr']:g}: gold {p['curve'][-1]['gold']:.3f}, "
                   f"KL {p['curve'][-1]['kl']:.2f}")
    out += ["", "## Final gold reward (mean ± 95% t-CI over seeds) [final KL]", ""]
    out += _table(rows, "default", lambda r: f"{fmt(r['gold'])} [{r['kl'][0]:.2f}]")
    out += ["", "## Final proxy reward (what training maximised) — proxy minus gold is the over-optimisation", ""]
    out += _table(rows, "default", lambda r: f"{fmt(r['proxy'])} (gap {r['proxy'][0] - r['gold'][0]:+.3f})")
    kappa = ", ".join(f"{s}: KL = {k:.2f} nats" for s, k in matched_kl(report["runs"]).items())
    out += ["", f"## Gold reward at matched KL ({kappa}: the largest KL every run reaches)", ""]
    out += _table(rows, "default", lambda r: fmt(r["gold_at_matched_kl"]))
    out += ["", "## Gold reward at each loss's own matched KL (the largest KL all of that loss's runs reach)", ""]
    out += _table(rows, "default", lambda r: f"{fmt(r['gold_at_loss_matched_kl'])} @ {r['loss_matched_kl']:.2f}")
    out += ["", "## Welch t-test p-values on final gold: vs the same loss at N=0 / vs online DPO at the same N", ""]
    out += _table(rows, "default", lambda r: f"{fp(r['p_vs_N0'])} / {fp(r['p_vs_online_dpo'])}")
    out += _robustness(report["runs"])
    ablation = [r for r in rows if r["switch"] != "default"]
    if ablation:
        out += ["", "## Ablation of the off-policy switches (proximal-rloo): final gold [KL], p vs default switch",
                "", "| size | switch | N | gold | KL | gold at matched KL | p vs default |", "|---|---|---|---|---|---|---|"]
        for r in ablation:
            out.append(f"| {r['size']} | {r['switch']} ({json.dumps(report['switches'][r['switch']])}) | {r['N']} | "
                       f"{fmt(r['gold'])} | {fmt(r['kl'], 2)} | {fmt(r['gold_at_matched_kl'])} | "
                       f"{fp(r['p_vs_default_switch'])} |")
    return "\n".join(out) + "\n"


def staleness_slope(runs: list[dict]) -> dict:
    """OLS of final gold on log2(1 + N) over every (default-switch) run of a cell group: the slope (gold per
    doubling of 1 + N), its 95% t interval and its two-sided p-value against 0; the larger (less negative)
    the slope, the more robust the loss. nan with fewer than 3 runs or one N."""
    xs = [math.log2(1 + r["n"]) for r in runs]
    ys = [r["curve"][-1]["gold"] for r in runs]
    if len(runs) < 3 or len(set(xs)) < 2:
        return {"slope": math.nan, "half": math.nan, "p": math.nan, "runs": len(runs)}
    fit = stats.linregress(xs, ys)
    half = float(stats.t.ppf(0.975, len(runs) - 2)) * fit.stderr
    return {"slope": float(fit.slope), "half": half, "p": float(fit.pvalue), "runs": len(runs)}


def _robustness(runs: list[dict]) -> list[str]:
    groups: dict = {}
    for r in runs:
        if r["switch"] == "default":
            groups.setdefault((r["size"], r["loss"]), []).append(r)
    out = ["", "## Robustness: slope of final gold on log2(1 + N) (per doubling of 1 + N; 95% t-CI; p vs 0)", "",
           "| size | loss | slope | p | runs |", "|---|---|---|---|---|"]
    for (size, loss), rs in groups.items():
        s = staleness_slope(rs)
        out.append(f"| {size} | {loss} | {fmt((s['slope'], s['half']))} | {fp(s['p'])} | {s['runs']} |")
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = cells(report["runs"])
    sizes = list(dict.fromkeys(s for s, _, _, _ in grouped))  # one row of panels per model size
    rows = [list(dict.fromkeys((s, loss, False) for s, loss, _, _ in grouped if s == size))
            + list(dict.fromkeys((s, loss, True) for s, loss, switch, _ in grouped if switch != "default" and s == size))
            for size in sizes]
    ablated = {n for _, _, switch, n in grouped if switch != "default"}
    width = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(4.2 * width, 3.8 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (size, loss, switches) in ((axes[i][j], panel) for i, r in enumerate(rows) for j, panel in enumerate(r)):
        ax.set_visible(True)
        keys = sorted(k for k in grouped if k[:2] == (size, loss)
                      and ((k[2] != "default" or k[3] in ablated) if switches else k[2] == "default"))
        for i, key in enumerate(keys):
            rs = grouped[key]
            kl = [sum(r["curve"][j]["kl"] for r in rs) / len(rs) for j in range(len(rs[0]["curve"]))]
            gold = [sum(r["curve"][j]["gold"] for r in rs) / len(rs) for j in range(len(rs[0]["curve"]))]
            style = "-" if key[2] == "default" else "--"
            line, = ax.plot(kl, gold, style, marker="o", ms=3, label=f"N={key[3]}" + (
                "" if key[2] == "default" else f" {key[2]}"), color=plt.cm.viridis(i / max(1, len(keys) - 1)))
            ax.scatter([r["curve"][-1]["kl"] for r in rs], [r["curve"][-1]["gold"] for r in rs], s=10,
                       color=line.get_color(), alpha=0.5)
        ax.set_title(f"{loss} ({size})" + (": off-policy switches" if switches else ""))
        ax.set_xlabel("KL(π‖π_ref), nats (fresh samples)")
        ax.set_ylabel("gold reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(report)
    report = {**report, "summary": rows}
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report, rows))
    plot(report, paths[2])
    return paths
