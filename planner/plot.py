"""`pqmesh plan --plot plan.png`: one picture of a plan, drawn from the same cost model that chose it.

Top: each stage's predicted memory on its device (weights by bitwidth, embeddings/head, KV cache,
temporary activations, framework reserve, free up to the capacity), and its layers as a strip of cells
coloured by bitwidth. Bottom: each device's predicted busy time over the whole job per phase
(prefill, decode) for our plan next to every feasible baseline, and the job's pipeline time by phase
with the predicted throughput. matplotlib is imported here only (Agg backend, no display needed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from planner.memory import GIB, layer_weight_bytes
from planner.plans import PlanResult
from planner.problem import Problem, evaluate, stage_seconds
from pqmesh.plan import PipelinePlan
from pqmesh.types import STORED_BITS, Bits, Phase

FIGSIZE = (16, 10)  # inches
DPI = 100  # -> 1600 x 1000 pixels
BIT_COLORS = {Bits.B16: "#1f4e9c", Bits.B8: "#3a9a5b", Bits.B6: "#7fbf4d", Bits.B5: "#c9c23a", Bits.B4: "#f0a030",
              Bits.B3: "#d9534f", Bits.B2: "#8e44ad"}
PART_COLORS = {"embeddings + head": "#7f9bb3", "KV cache": "#2ab7ca", "activations (temp)": "#f6d55c",
               "reserve": "#9e9e9e"}
PLAN_COLORS = ["#222222", "#17becf", "#bcbd22", "#e377c2", "#8c564b", "#7f7f7f"]  # ours first; unlike the bit colours


@dataclass(frozen=True)
class StageBars:
    """One stage's memory parts in bytes (weights per bitwidth first) and its device's capacity."""

    label: str
    parts: dict[str, int]
    capacity: int


def memory_bars(problem: Problem, plan: PipelinePlan) -> list[StageBars]:
    ev = evaluate(problem, plan)
    bars = []
    for i, (stage, mem, cap) in enumerate(zip(plan.stages, ev.memory, ev.capacity)):
        parts = {f"weights {int(b)}-bit": n * layer_weight_bytes(problem.shape, b, element=problem.element)
                 for b, n in sorted(Counter(stage.bits).items(), reverse=True)}
        parts |= {"embeddings + head": mem.embeddings_and_head, "KV cache": mem.kv_cache,
                  "activations (temp)": mem.activations + mem.workspace, "reserve": mem.reserve}
        host = problem.device(stage.device).host
        where = f"{host}, " if host else ""
        bars.append(StageBars(f"{i}: {stage.device}\n{where}layers [{stage.start}, {stage.end})", parts, cap))
    return bars


def busy_seconds(problem: Problem, plan: PipelinePlan) -> dict[str, tuple[float, float]]:
    """Device label -> (prefill, decode) seconds it computes over the whole job (no links, no bubbles)."""
    last = len(plan.stages) - 1
    out = {}
    for i, stage in enumerate(plan.stages):
        device, counts = problem.device(stage.device), dict(Counter(stage.bits))
        prefill = problem.micro_batches(plan.prefill_micro_batch) * stage_seconds(
            problem, device, counts, i == last, Phase.PREFILL, plan.prefill_micro_batch,
            problem.prefill_length(plan.prefill_micro_batch))
        decode = sum(rounds * problem.micro_batches(plan.decode_micro_batch) * stage_seconds(
            problem, device, counts, i == last, Phase.DECODE, plan.decode_micro_batch, context)
            for rounds, context in problem.segments())
        out[stage.device] = (prefill, decode)
    return out


def _plans(result: PlanResult) -> dict[str, tuple[PipelinePlan, object]]:
    """'ours' and every feasible baseline with its plan: name -> (plan, prediction)."""
    found = {"ours (LLM-PQ)": (result.plan, result.predicted)}
    for name, b in sorted(result.baselines.items()):
        if b.feasible and b.plan is not None:
            found[name] = (b.plan, b.predicted)
    return found


def _draw_memory(ax, bars: list[StageBars]) -> None:
    for y, bar in enumerate(bars):
        left = 0.0
        for name, nbytes in bar.parts.items():
            color = (
                BIT_COLORS[Bits(int(name.split()[1].split("-")[0]))]
                if name.startswith("weights")
                else PART_COLORS[name]
            )
            ax.barh(y, nbytes / GIB, left=left, color=color, edgecolor="white", linewidth=0.5, label=name)
            left += nbytes / GIB
        free = max(bar.capacity / GIB - left, 0.0)
        ax.barh(y, free, left=left, color="white", edgecolor="#bbbbbb", hatch="//", linewidth=0.5, label="free")
        ax.plot([bar.capacity / GIB] * 2, [y - 0.42, y + 0.42], color="black", linewidth=2)
        ax.text(bar.capacity / GIB, y, f" {left:.1f} / {bar.capacity / GIB:.1f} GiB", va="center", ha="left",
                fontsize=8)
    ax.set_yticks(range(len(bars)), [b.label for b in bars], fontsize=8)
    ax.set_ylim(len(bars) - 0.5, -0.5)
    ax.set_xlim(0, max(b.capacity for b in bars) / GIB * 1.22)
    ax.set_xlabel("GiB (black tick: the device's capacity)")
    ax.set_title("Predicted memory per stage")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(sorted(zip(labels, handles), key=lambda kv: _legend_rank(kv[0])))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5,
              frameon=False)


def _legend_rank(label: str) -> tuple[int, int]:
    if label.startswith("weights"):
        return (0, -int(label.split()[1].split("-")[0]))
    return (1, list(PART_COLORS).index(label)) if label in PART_COLORS else (2, 0)


def _draw_layers(ax, plan: PipelinePlan) -> None:
    for y, stage in enumerate(plan.stages):
        for layer, bits in enumerate(stage.bits, start=stage.start):
            ax.barh(y, 1, left=layer, color=BIT_COLORS[bits], edgecolor="white", linewidth=0.3)
        if (stage.end - stage.start) / plan.num_layers >= 0.15:  # narrow stages: the tick label says it
            ax.text((stage.start + stage.end) / 2, y, f"[{stage.start}, {stage.end})", ha="center", va="center",
                    fontsize=8, color="white", fontweight="bold")
    used = sorted({b for s in plan.stages for b in s.bits}, reverse=True)
    import matplotlib.patches as mpatches

    ax.legend([mpatches.Patch(color=BIT_COLORS[b]) for b in STORED_BITS if b in used],
              [f"{int(b)}-bit" for b in STORED_BITS if b in used], title="layer bits", fontsize=8, title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xlim(0, plan.num_layers)
    ax.set_yticks(range(len(plan.stages)), [f"stage {i}\n{s.device}" for i, s in enumerate(plan.stages)], fontsize=8)
    ax.set_ylim(len(plan.stages) - 0.5, -0.5)
    ax.set_xlabel("decoder layer")
    ax.set_title("Layers per stage, coloured by bitwidth")


def _draw_busy(ax, result: PlanResult, problem: Problem, phase: int, title: str) -> None:
    plans = _plans(result)
    devices = [d.label for d in problem.devices]
    width = 0.8 / len(plans)
    for k, (name, (plan, _)) in enumerate(plans.items()):
        busy = busy_seconds(problem, plan)
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(devices))]
        ax.bar(xs, [busy.get(d, (0.0, 0.0))[phase] for d in devices], width, color=PLAN_COLORS[k % len(PLAN_COLORS)],
               label=name)
    ax.set_xticks(range(len(devices)), devices, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds over the job")
    ax.set_title(title)


def _draw_job(ax, result: PlanResult) -> None:
    plans = _plans(result)
    names = list(plans)
    prefill = [p.prefill_s for _, p in plans.values()]
    decode = [p.decode_s for _, p in plans.values()]
    ax.barh(names, prefill, color="#5b8def", label="prefill")
    ax.barh(names, decode, left=prefill, color="#f28e2b", label="decode")
    ours = result.predicted.throughput_tokens_per_s
    for y, (name, (_, p)) in enumerate(plans.items()):
        gain = "" if y == 0 else f"\nours is {ours / p.throughput_tokens_per_s:.2f}x"
        ax.text(p.prefill_s + p.decode_s, y, f" {p.throughput_tokens_per_s:.1f} tok/s{gain}", va="center", fontsize=8)
    infeasible = [n for n, b in sorted(result.baselines.items()) if not b.feasible]
    if infeasible:
        ax.text(0.0, -0.36, "infeasible (no fitting plan): " + ", ".join(infeasible), transform=ax.transAxes,
                fontsize=8, color="#a33")
    ax.set_xlim(0, max(p + d for p, d in zip(prefill, decode)) * 1.5)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("predicted pipeline seconds")
    ax.set_title("Job time by phase and throughput")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def plot_plan(result: PlanResult, problem: Problem, path: Path) -> Path:
    """Draws the plan to ``path`` (PNG, FIGSIZE x DPI pixels) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, pred = problem.workload, result.predicted
    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    grid = fig.add_gridspec(2, 3, height_ratios=[1.1, 1], hspace=0.62, wspace=0.38,
                            left=0.11, right=0.93, top=0.89, bottom=0.14)
    _draw_memory(fig.add_subplot(grid[0, :2]), memory_bars(problem, result.plan))
    _draw_layers(fig.add_subplot(grid[0, 2]), result.plan)
    prefill_ax = fig.add_subplot(grid[1, 0])
    _draw_busy(prefill_ax, result, problem, 0, "Prefill: busy time per device\n"
               f"(ours: micro-batch {result.plan.prefill_micro_batch})")
    _draw_busy(fig.add_subplot(grid[1, 1]), result, problem, 1, "Decode: busy time per device\n"
               f"(ours: micro-batch {result.plan.decode_micro_batch})")
    handles, labels = prefill_ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, loc="lower center", bbox_to_anchor=(0.36, 0.0), ncol=len(labels),
               frameon=False, title="plan (baselines: the planner's own, same cost model)", title_fontsize=9)
    _draw_job(fig.add_subplot(grid[1, 2]), result)
    fig.suptitle(f"pqmesh plan {result.plan.plan_id}: {problem.shape.name} on {len(problem.devices)} devices, "
                 f"batch {w.batch_size} x (prompt {w.prompt_length} + {w.generation_length} new tokens)\n"
                 f"predicted {pred.throughput_tokens_per_s:.1f} tokens/s, prefill {pred.prefill_s:.2f} s + decode "
                 f"{pred.decode_s:.2f} s, quality indicator {pred.quality:.3g}", fontsize=12)
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
