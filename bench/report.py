"""Suite results: the JSON record, the summary table (imserver as ratios), the latency plot.

Theory of operation
-------------------
``SuiteResult`` is what ``bench.run`` records: machine facts, the profile,
and per target either ``skipped`` (with the reason: no figures at all) or
one ``ScenarioOutcome`` per scenario (``ok`` with its report, ``todo``, or
``error`` with the message). It is written as JSON with msgspec (each
report tagged with its scenario in ``"type"``), and ``read_json`` reads it
back: ``python -m bench.report FILE`` prints the summary table and the
peak-sale steps of a recorded run as Markdown (for RESULTS.md).

The summary picks a few headline ``metrics`` out of the reports. Each is a
number per target; imserver's is also given as a ratio to each baseline
(``imserver / baseline``: above 1 is better for throughput, worse for
latency, memory and CPU; the ``better`` column says which). Peak-sale
latencies are compared at the profile's reference loads, the same offered
loads for every target.

The plot shows peak-sale p50 (dashed) and p99 (solid) send->delivery
against offered load, one colour per target, log scale, with the SLO line;
a black x marks a step during which other processes used the host's CPU.
matplotlib (Agg backend) is optional: without it the plot is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final, NamedTuple

import msgspec

from bench.loadgen.bot_heavy import BotHeavyReport
from bench.loadgen.fanout import FanoutReport
from bench.loadgen.idle import IdleReport
from bench.loadgen.peak_sale import NOISY_FOREIGN_PCT, PeakSaleReport, StepReport
from bench.loadgen.reconnect_storm import StormReport
from bench.loadgen.suite import Report, SuiteProfile
from bench.loadgen.sysstat import MachineInfo

IMSERVER: Final = "imserver"
PLOT_SIZE_IN: Final = (9.0, 5.5)
PLOT_DPI: Final = 110
COLOURS: Final = {"imserver": "tab:red", "trio_wsproto": "tab:blue", "websockets": "tab:green"}


class ScenarioOutcome(msgspec.Struct, kw_only=True):
    status: str
    """ok, todo or error."""
    seconds: float = 0.0
    error: str = ""
    report: Report | None = None


class TargetResult(msgspec.Struct, kw_only=True):
    name: str
    description: str
    status: str
    """ok (ran; see each scenario) or skipped (did not start: no figures)."""
    reason: str = ""
    scenarios: dict[str, ScenarioOutcome] = {}


class SuiteResult(msgspec.Struct, kw_only=True):
    date: str
    started_at: str
    finished_at: str = ""
    command: str
    git_commit: str = ""
    git_dirty: bool = False
    """Uncommitted changes in the working tree when the run started."""
    machine: MachineInfo
    host_steal_pct: float = 0.0
    profile: SuiteProfile
    targets: dict[str, TargetResult] = {}


def read_json(path: Path) -> SuiteResult:
    return msgspec.json.decode(path.read_bytes(), type=SuiteResult)


def write_json(result: SuiteResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2) + b"\n")
    tmp.replace(path)


# ----------------------------------------------------------------- metrics


def _report(target: TargetResult, scenario: str) -> Report | None:
    outcome = target.scenarios.get(scenario)
    return outcome.report if outcome is not None and outcome.status == "ok" else None


def _peak(target: TargetResult) -> PeakSaleReport | None:
    report = _report(target, "peak_sale")
    return report if isinstance(report, PeakSaleReport) else None


def _step_at(target: TargetResult, load: int) -> StepReport | None:
    peak = _peak(target)
    if peak is None:
        return None
    return next((s for s in peak.steps if s.offered_msgs_per_s == load), None)


def _fanout(target: TargetResult) -> FanoutReport | None:
    report = _report(target, "fanout")
    return report if isinstance(report, FanoutReport) else None


def _storm(target: TargetResult) -> StormReport | None:
    report = _report(target, "reconnect_storm")
    return report if isinstance(report, StormReport) else None


def _idle(target: TargetResult) -> IdleReport | None:
    report = _report(target, "idle")
    return report if isinstance(report, IdleReport) else None


Extract = Callable[[TargetResult], float | None]


class Metric(NamedTuple):
    label: str
    better: str
    """higher, lower, or "" for context rows that get no ratio (noise)."""
    extract: Extract


def _max_sustained(t: TargetResult) -> float | None:
    peak = _peak(t)
    if peak is None:
        return None
    return float(peak.max_sustained_msgs_per_s or 0)


def _noise(t: TargetResult) -> float | None:
    peak = _peak(t)
    if peak is None or not peak.steps:
        return None
    return sum(s.foreign_cpu_pct for s in peak.steps) / len(peak.steps)


def _at(load: int, field: Callable[[StepReport], float]) -> Extract:
    def extract(t: TargetResult) -> float | None:
        step = _step_at(t, load)
        return field(step) if step is not None else None
    return extract


def _fan(field: Callable[[FanoutReport], float]) -> Extract:
    def extract(t: TargetResult) -> float | None:
        report = _fanout(t)
        return field(report) if report is not None else None
    return extract


def _stm(field: Callable[[StormReport], float | None]) -> Extract:
    def extract(t: TargetResult) -> float | None:
        report = _storm(t)
        return field(report) if report is not None else None
    return extract


def _idl(field: Callable[[IdleReport], float]) -> Extract:
    def extract(t: TargetResult) -> float | None:
        report = _idle(t)
        return field(report) if report is not None else None
    return extract


def metrics(reference_loads: tuple[int, ...]) -> list[Metric]:
    """The summary rows; peak-sale latencies at each reference load (same for all targets)."""
    rows = [
        Metric("peak-sale: max msg/s with p99 < SLO", "higher", _max_sustained),
        Metric("peak-sale: others' CPU % (noise, mean)", "", _noise),
    ]
    for load in reference_loads:
        at = f"peak-sale @{load:,}/s"
        rows += [
            Metric(f"{at}: delivery p50 ms", "lower", _at(load, lambda s: s.delivery.p50_ms)),
            Metric(f"{at}: delivery p99 ms", "lower", _at(load, lambda s: s.delivery.p99_ms)),
            Metric(f"{at}: delivery p99.9 ms", "lower", _at(load, lambda s: s.delivery.p999_ms)),
            Metric(f"{at}: send->Sent p99 ms", "lower", _at(load, lambda s: s.ack.p99_ms)),
            Metric(f"{at}: server CPU us/msg", "lower",
                   _at(load, lambda s: s.server_cpu_us_per_msg)),
        ]
    rows += [
        Metric("fan-out: deliveries/s", "higher", _fan(lambda r: r.deliveries_per_s)),
        Metric("fan-out: delivery p99 ms", "lower", _fan(lambda r: r.delivery.p99_ms)),
        Metric("fan-out: completion p99 ms", "lower", _fan(lambda r: r.completion.p99_ms)),
        Metric("fan-out: server CPU us/delivery", "lower",
               _fan(lambda r: r.server_cpu_us_per_delivery)),
        Metric("storm: time to all resumed ms", "lower", _stm(lambda r: r.time_to_all_resumed_ms)),
        Metric("storm: lost messages", "lower", _stm(lambda r: float(r.lost))),
        Metric("storm: duplicated messages", "lower", _stm(lambda r: float(r.duplicates))),
        Metric("idle: server RSS KiB/connection", "lower", _idl(lambda r: r.rss_per_connection_kb)),
        Metric("idle: ping p99 ms", "lower", _idl(lambda r: r.ping_rtt.p99_ms)),
    ]
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def summary_table(result: SuiteResult) -> str:
    names = list(result.targets)
    ran = [n for n in names if result.targets[n].status == "ok"]
    baselines = [n for n in ran if n != IMSERVER]
    with_ratios = IMSERVER in ran
    header = ["metric", "better", *names]
    if with_ratios:
        header += [f"{IMSERVER}/{b}" for b in baselines]
    rows: list[list[str]] = []
    for metric in metrics(result.profile.reference_loads):
        values = {n: metric.extract(result.targets[n]) if n in ran else None for n in names}
        row = [metric.label, metric.better, *(_fmt(values[n]) for n in names)]
        if with_ratios:
            mine = values[IMSERVER]
            for b in baselines:
                theirs = values[b]
                if metric.better and mine is not None and theirs:
                    row.append(f"{mine / theirs:.2f}x")
                else:
                    row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    notes = [f"(@N/s = at offered load N msg/s, the same for every target; SLO p99 < "
             f"{result.profile.peak_sale.slo_p99_ms:.0f} ms; '-' = not measured or not reached; "
             "ratios are imserver / baseline)"]
    todo: dict[str, str] = {}
    for name in names:
        target = result.targets[name]
        peak = _peak(target)
        if peak is not None and peak.generator_bound:
            notes.append(f"{name}: the load generator saturated during the peak-sale ramp; "
                         "its max msg/s is a lower bound (the generator's ceiling on this box)")
        if target.status != "ok":
            notes.append(f"{name}: SKIPPED - {target.reason.splitlines()[0] if target.reason else ''}")
        for scenario, outcome in target.scenarios.items():
            if outcome.status == "error":
                notes.append(f"{name}/{scenario}: ERROR - {outcome.error.splitlines()[0]}")
            elif outcome.status == "todo" and isinstance(outcome.report, BotHeavyReport):
                todo[scenario] = outcome.report.reason
    notes.extend(f"{scenario}: {reason}" for scenario, reason in todo.items())
    if not with_ratios:
        notes.append(f"no {IMSERVER} figures in this run, so no ratios")
    return "\n".join(lines + notes)


def plot_latency(result: SuiteResult, path: Path) -> str | None:
    """Draw the p50/p99-vs-load plot; returns why not if it could not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    fig, ax = plt.subplots(figsize=PLOT_SIZE_IN)
    drawn = 0
    marked_noisy = False
    for name, target in result.targets.items():
        peak = _peak(target)
        if peak is None or not peak.steps:
            continue
        loads = [s.offered_msgs_per_s for s in peak.steps]
        colour = COLOURS.get(name)
        ax.plot(loads, [max(s.delivery.p99_ms, 0.01) for s in peak.steps], "-o", color=colour,
                label=f"{name} p99")
        ax.plot(loads, [max(s.delivery.p50_ms, 0.01) for s in peak.steps], "--s", color=colour,
                label=f"{name} p50", alpha=0.8)
        noisy = [s for s in peak.steps if s.foreign_cpu_pct >= NOISY_FOREIGN_PCT]
        if noisy:
            ax.plot([s.offered_msgs_per_s for s in noisy],
                    [max(s.delivery.p99_ms, 0.01) for s in noisy], "x", color="black",
                    markersize=9, label="_noisy" if marked_noisy else
                    f"noisy step (others >= {NOISY_FOREIGN_PCT:.0f}% cpu)")
            marked_noisy = True
        drawn += 1
    if not drawn:
        plt.close(fig)
        return "no peak-sale results to plot"
    ax.axhline(result.profile.peak_sale.slo_p99_ms, color="grey", linestyle=":",
               label=f"SLO p99 {result.profile.peak_sale.slo_p99_ms:.0f} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (messages/s, 1:1 pairs, 200-byte payloads)")
    ax.set_ylabel("send -> delivery (ms)")
    m = result.machine
    ax.set_title(f"peak sale, {result.date} ({result.profile.name}); "
                 f"{m.nproc} cores {m.cpu_model}, steal {result.host_steal_pct:.0f}%", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return None


def steps_markdown(result: SuiteResult) -> str:
    """The peak-sale ramp of every target as a Markdown table."""
    lines = [
        "| target | offered msg/s | delivered | p50 ms | p99 ms | p99.9 ms | max ms | "
        "send->Sent p99 ms | server µs/msg | loadgen % | others % | verdict |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, target in result.targets.items():
        peak = _peak(target)
        if peak is None:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | - | - | "
                         f"{target.status} {target.reason.splitlines()[0] if target.reason else ''} |")
            continue
        for s in peak.steps:
            d = s.delivery
            lines.append(
                f"| {name} | {s.offered_msgs_per_s:,} | {s.delivered:,}/{s.sent:,} | "
                f"{d.p50_ms:.1f} | {d.p99_ms:.1f} | {d.p999_ms:.1f} | {d.max_ms:.0f} | "
                f"{s.ack.p99_ms:.1f} | {s.server_cpu_us_per_msg:.0f} | {s.loadgen_cpu_pct:.0f} | "
                f"{s.foreign_cpu_pct:.0f} | {'pass' if s.passed else 'FAIL'}: {s.verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description="Render a recorded suite run.")
    parser.add_argument("file", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="also draw the latency plot")
    args = parser.parse_args(argv)
    result = read_json(args.file)
    dirty = " + uncommitted changes" if result.git_dirty else ""
    print(f"run {result.started_at} .. {result.finished_at}: `{result.command}` "
          f"(commit {result.git_commit or '?'}{dirty})\n")
    print("```\n" + summary_table(result) + "\n```\n")
    print(steps_markdown(result))
    if args.plot is not None:
        why_not = plot_latency(result, args.plot)
        if why_not:
            print(f"\nplot skipped: {why_not}")


if __name__ == "__main__":
    main()
