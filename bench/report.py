"""Suite results: the JSON record, the summary table (imserver as ratios), the latency plot.

Theory of operation
-------------------
``SuiteResult`` is what ``bench.run`` records: machine facts, the profile,
and per target either ``skipped`` (with the reason: no figures at all) or
one ``ScenarioOutcome`` per scenario (``ok`` with its report, ``n/a`` with
the reason, or ``error`` with the message; each with a summary of the
server's log). It is written as JSON with msgspec (each report tagged with
its scenario in ``"type"``), and ``read_json`` reads it back (also runs
recorded before bot-heavy existed, whose placeholder reports are dropped):
``python -m bench.report FILE`` prints the summary table, the peak-sale
steps and the bot-heavy figures of a recorded run as Markdown (for
RESULTS.md).

The summary picks a few headline ``metrics`` out of the reports. Each is a
number per target; imserver's is also given as a ratio to each baseline
(``imserver / baseline``: above 1 is better for throughput, worse for
latency, memory and CPU; the ``better`` column says which). Peak-sale
latencies are compared at the profile's reference loads, the same offered
loads for every target. A target for which a scenario is ``n/a`` (the
relays have no bot) shows ``n/a`` in that scenario's rows.

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
from bench.loadgen.histogram import LatencySummary
from bench.loadgen.idle import IdleReport
from bench.loadgen.independent import IndependentReport
from bench.loadgen.peak_sale import NOISY_FOREIGN_PCT, PeakSaleReport, StepReport
from bench.loadgen.reconnect_storm import StormReport
from bench.loadgen.suite import Report, SuiteProfile
from bench.loadgen.sysstat import MachineInfo
from bench.servers import ServerLog

IMSERVER: Final = "imserver"
PLOT_SIZE_IN: Final = (9.0, 5.5)
PLOT_DPI: Final = 110
COLOURS: Final = {
    "imserver": "tab:red",
    "trio_wsproto": "tab:blue",
    "trio_sansio": "tab:purple",
    "websockets": "tab:green",
}


class ScenarioOutcome(msgspec.Struct, kw_only=True):
    status: str
    """ok, n/a (the target cannot run it: the reason is in ``error``) or error."""
    seconds: float = 0.0
    error: str = ""
    report: Report | None = None
    server_log: ServerLog | None = None
    """Warnings and errors the server logged during the scenario (None: not read)."""


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
    calibration_end_us: float = 0.0
    """The machine's calibration workload timed again after the run (0: not recorded):
    far from ``machine.calibration_us``, the host's speed changed during the run."""
    profile: SuiteProfile
    targets: dict[str, TargetResult] = {}


def read_json(path: Path) -> SuiteResult:
    raw = msgspec.json.decode(path.read_bytes())
    for target in raw.get("targets", {}).values():
        for outcome in target.get("scenarios", {}).values():
            if outcome.get("status") == "todo":  # runs from before bot-heavy existed
                outcome["status"], outcome["report"] = "n/a", None
                outcome["error"] = "not implemented at the time of this run"
    return msgspec.convert(raw, type=SuiteResult)


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


def _bot(target: TargetResult) -> BotHeavyReport | None:
    report = _report(target, "bot_heavy")
    return report if isinstance(report, BotHeavyReport) else None


Extract = Callable[[TargetResult], float | None]


class Metric(NamedTuple):
    label: str
    better: str
    """higher, lower, or "" for context rows that get no ratio (noise)."""
    extract: Extract
    scenario: str = ""
    """The scenario the figure comes from: a target for which it is n/a shows n/a."""


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


def _bt(field: Callable[[BotHeavyReport], float]) -> Extract:
    def extract(t: TargetResult) -> float | None:
        report = _bot(t)
        return field(report) if report is not None else None

    return extract


def _ind(load: int, field: Callable[[StepReport], float]) -> Extract:
    def extract(t: TargetResult) -> float | None:
        report = _report(t, "independent")
        if not isinstance(report, IndependentReport):
            return None
        point = next((p for p in report.points if p.offered_msgs_per_s == load), None)
        return field(point) if point is not None else None

    return extract


def metrics(
    reference_loads: tuple[int, ...], independent_points: tuple[int, ...] = ()
) -> list[Metric]:
    """The summary rows; peak-sale latencies at each reference load (same for all targets),
    then the independent client's figures at each of its points."""
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
            Metric(
                f"{at}: server CPU us/msg", "lower", _at(load, lambda s: s.server_cpu_us_per_msg)
            ),
        ]
    rows += [
        Metric("fan-out: deliveries/s", "higher", _fan(lambda r: r.deliveries_per_s)),
        Metric("fan-out: delivery p99 ms", "lower", _fan(lambda r: r.delivery.p99_ms)),
        Metric("fan-out: completion p99 ms", "lower", _fan(lambda r: r.completion.p99_ms)),
        Metric(
            "fan-out: server CPU us/delivery", "lower", _fan(lambda r: r.server_cpu_us_per_delivery)
        ),
        Metric("storm: time to all resumed ms", "lower", _stm(lambda r: r.time_to_all_resumed_ms)),
        Metric("storm: lost messages", "lower", _stm(lambda r: float(r.lost))),
        Metric("storm: duplicated messages", "lower", _stm(lambda r: float(r.duplicates))),
        Metric("idle: server RSS KiB/connection", "lower", _idl(lambda r: r.rss_per_connection_kb)),
        Metric("idle: ping p99 ms", "lower", _idl(lambda r: r.ping_rtt.p99_ms)),
    ]
    for load in independent_points:
        at = f"independent client @{load:,}/s"
        rows += [
            Metric(
                f"{at}: delivered %",
                "higher",
                _ind(load, lambda s: 100 * s.delivered / s.sent if s.sent else 0.0),
                "independent",
            ),
            Metric(
                f"{at}: delivery p50 ms",
                "lower",
                _ind(load, lambda s: s.delivery.p50_ms),
                "independent",
            ),
            Metric(
                f"{at}: delivery p99 ms",
                "lower",
                _ind(load, lambda s: s.delivery.p99_ms),
                "independent",
            ),
            Metric(
                f"{at}: server CPU us/msg",
                "lower",
                _ind(load, lambda s: s.server_cpu_us_per_msg),
                "independent",
            ),
            Metric(
                f"{at}: others' CPU % (noise)",
                "",
                _ind(load, lambda s: s.foreign_cpu_pct),
                "independent",
            ),
        ]
    bot = "bot_heavy"
    rows += [
        Metric("bot-heavy: questions/s offered", "", _bt(lambda r: r.offered_questions_per_s), bot),
        Metric(
            "bot-heavy: answered by the bot %", "", _bt(lambda r: 100 * r.bot_answered_share), bot
        ),
        Metric("bot-heavy: handed to a human %", "", _bt(lambda r: 100 * r.handed_off_share), bot),
        Metric("bot-heavy: unanswered questions", "lower", _bt(lambda r: float(r.unanswered)), bot),
        Metric("bot-heavy: reply p50 ms", "lower", _bt(lambda r: r.reply.p50_ms), bot),
        Metric("bot-heavy: reply p90 ms", "lower", _bt(lambda r: r.reply.p90_ms), bot),
        Metric("bot-heavy: reply p99 ms", "lower", _bt(lambda r: r.reply.p99_ms), bot),
        Metric("bot-heavy: reply max ms", "lower", _bt(lambda r: r.reply.max_ms), bot),
        Metric("bot-heavy: handoff to queued p99 ms", "lower", _bt(lambda r: r.queued.p99_ms), bot),
        Metric(
            "bot-heavy: server + bot CPU us/question",
            "lower",
            _bt(lambda r: r.server_cpu_us_per_question + r.worker_cpu_us_per_question),
            bot,
        ),
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


def _not_applicable(target: TargetResult, scenario: str) -> bool:
    outcome = target.scenarios.get(scenario) if scenario else None
    return outcome is not None and outcome.status == "n/a"


def host_line(result: SuiteResult) -> str:
    """What makes this run's absolute figures comparable with another host's."""
    m = result.machine
    fsync = (
        f"fsync 4 KiB p50 {m.fsync.p50_us:,.0f} us (p90 {m.fsync.p90_us:,.0f}, "
        f"{m.fsync.cpu_us:.0f} us CPU)"
        if m.fsync is not None
        else "fsync not probed"
    )
    calibration = (
        f"calibration {m.calibration_us:,.0f} us"
        + (
            f" (after the run {result.calibration_end_us:,.0f})"
            if result.calibration_end_us
            else ""
        )
        if m.calibration_us
        else "no calibration"
    )
    return (
        f"host: {m.nproc} x {m.cpu_model} @ {m.cpu_mhz:,.0f} MHz, {calibration}, {fsync}, "
        f"steal {result.host_steal_pct:.1f}% over the run"
    )


def summary_table(result: SuiteResult) -> str:
    names = list(result.targets)
    ran = [n for n in names if result.targets[n].status == "ok"]
    baselines = [n for n in ran if n != IMSERVER]
    with_ratios = IMSERVER in ran
    header = ["metric", "better", *names]
    if with_ratios:
        header += [f"{IMSERVER}/{b}" for b in baselines]
    rows: list[list[str]] = []
    independent = result.profile.independent
    points = independent.points if independent is not None else ()
    for metric in metrics(result.profile.reference_loads, points):
        values = {n: metric.extract(result.targets[n]) if n in ran else None for n in names}
        row = [
            metric.label,
            metric.better,
            *(
                "n/a" if _not_applicable(result.targets[n], metric.scenario) else _fmt(values[n])
                for n in names
            ),
        ]
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
    lines = [
        "  ".join(
            h.ljust(w) if i < 2 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    notes = [
        host_line(result),
        f"(@N/s = at offered load N msg/s, the same for every target; SLO p99 < "
        f"{result.profile.peak_sale.slo_p99_ms:.0f} ms; '-' = not measured or not reached; "
        "ratios are imserver / baseline)",
    ]
    not_applicable: dict[str, list[str]] = {}
    for name in names:
        target = result.targets[name]
        peak = _peak(target)
        if peak is not None and peak.generator_bound:
            notes.append(
                f"{name}: the load generator saturated during the peak-sale ramp; "
                "its max msg/s is a lower bound (the generator's ceiling on this box)"
            )
        if target.status != "ok":
            notes.append(
                f"{name}: SKIPPED - {target.reason.splitlines()[0] if target.reason else ''}"
            )
        for scenario, outcome in target.scenarios.items():
            if outcome.status == "error":
                notes.append(f"{name}/{scenario}: ERROR - {outcome.error.splitlines()[0]}")
            elif outcome.status == "n/a":
                not_applicable.setdefault(f"{scenario}: {outcome.error}", []).append(name)
            report = outcome.report
            if isinstance(report, BotHeavyReport) and not report.passed:
                notes.append(f"{name}/{scenario}: {report.verdict}")
            log = outcome.server_log
            if log is not None and (log.errors or log.unstructured):
                notes.append(
                    f"{name}/{scenario}: server log has {log.errors} errors and "
                    f"{log.unstructured} unstructured stderr lines"
                )
    notes.extend(f"{why} ({', '.join(who)})" for why, who in not_applicable.items())
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
        ax.plot(
            loads,
            [max(s.delivery.p99_ms, 0.01) for s in peak.steps],
            "-o",
            color=colour,
            label=f"{name} p99",
        )
        ax.plot(
            loads,
            [max(s.delivery.p50_ms, 0.01) for s in peak.steps],
            "--s",
            color=colour,
            label=f"{name} p50",
            alpha=0.8,
        )
        noisy = [s for s in peak.steps if s.foreign_cpu_pct >= NOISY_FOREIGN_PCT]
        if noisy:
            ax.plot(
                [s.offered_msgs_per_s for s in noisy],
                [max(s.delivery.p99_ms, 0.01) for s in noisy],
                "x",
                color="black",
                markersize=9,
                label="_noisy"
                if marked_noisy
                else f"noisy step (others >= {NOISY_FOREIGN_PCT:.0f}% cpu)",
            )
            marked_noisy = True
        drawn += 1
    if not drawn:
        plt.close(fig)
        return "no peak-sale results to plot"
    ax.axhline(
        result.profile.peak_sale.slo_p99_ms,
        color="grey",
        linestyle=":",
        label=f"SLO p99 {result.profile.peak_sale.slo_p99_ms:.0f} ms",
    )
    ax.set_yscale("log")
    ax.set_xlabel("offered load (messages/s, 1:1 pairs, 200-byte payloads)")
    ax.set_ylabel("send -> delivery (ms)")
    m = result.machine
    ax.set_title(
        f"peak sale, {result.date} ({result.profile.name}); "
        f"{m.nproc} cores {m.cpu_model}, steal {result.host_steal_pct:.0f}%",
        fontsize=9,
    )
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
            lines.append(
                f"| {name} | - | - | - | - | - | - | - | - | - | - | "
                f"{target.status} {target.reason.splitlines()[0] if target.reason else ''} |"
            )
            continue
        for s in peak.steps:
            d = s.delivery
            lines.append(
                f"| {name} | {s.offered_msgs_per_s:,} | {s.delivered:,}/{s.sent:,} | "
                f"{d.p50_ms:.1f} | {d.p99_ms:.1f} | {d.p999_ms:.1f} | {d.max_ms:.0f} | "
                f"{s.ack.p99_ms:.1f} | {s.server_cpu_us_per_msg:.0f} | {s.loadgen_cpu_pct:.0f} | "
                f"{s.foreign_cpu_pct:.0f} | {'pass' if s.passed else 'FAIL'}: {s.verdict} |"
            )
    return "\n".join(lines)


def independent_markdown(result: SuiteResult) -> str:
    """The independent client's points of every target as a Markdown table."""
    lines = [
        "| target | offered msg/s | delivered | p50 ms | p99 ms | p99.9 ms | max ms | "
        "send->Sent p99 ms | server µs/msg | client % | others % | verdict |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, target in result.targets.items():
        report = _report(target, "independent")
        if not isinstance(report, IndependentReport):
            continue
        for s in report.points:
            d = s.delivery
            lines.append(
                f"| {name} | {s.offered_msgs_per_s:,} | {s.delivered:,}/{s.sent:,} | "
                f"{d.p50_ms:.1f} | {d.p99_ms:.1f} | {d.p999_ms:.1f} | {d.max_ms:.0f} | "
                f"{s.ack.p99_ms:.1f} | {s.server_cpu_us_per_msg:.0f} | {s.loadgen_cpu_pct:.0f} | "
                f"{s.foreign_cpu_pct:.0f} | {'pass' if s.passed else 'FAIL'}: {s.verdict} |"
            )
    return "\n".join(lines)


def _ms(summary: LatencySummary) -> str:
    return (
        f"{summary.p50_ms:.1f} / {summary.p90_ms:.1f} / {summary.p99_ms:.1f} / {summary.max_ms:.0f}"
        if summary.count
        else "-"
    )


def bot_heavy_markdown(result: SuiteResult) -> str:
    """The bot-heavy figures of every target as a Markdown table (n/a for the relays)."""
    lines = [
        "| target | customers × q/s | questions (routine + human) | answered by bot | "
        "handed off | unanswered / wrong | reply p50 / p90 / p99 / max ms | "
        "routine reply p99 ms | handoff → queued p99 ms | welcome p99 ms | "
        "server + bot µs/question | loadgen % | others % | verdict |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, target in result.targets.items():
        outcome = target.scenarios.get("bot_heavy")
        r = _bot(target)
        if r is None:
            why = (
                outcome.error.splitlines()[0]
                if outcome is not None and outcome.error
                else (outcome.status if outcome is not None else target.status)
            )
            lines.append(f"| {name} | {why} |" + " |" * 12)
            continue
        p = r.params
        lines.append(
            f"| {name} | {r.customers_ready:,} × {p.rate:g} = {r.offered_questions_per_s:g}/s | "
            f"{r.questions:,} ({r.routine:,} + {r.human:,}) | "
            f"{r.answered_by_bot:,} ({100 * r.bot_answered_share:.1f}%) | "
            f"{r.handed_off:,} ({100 * r.handed_off_share:.1f}%) | "
            f"{r.unanswered} / {r.wrong_answers} | {_ms(r.reply)} | {r.reply_routine.p99_ms:.1f} | "
            f"{r.queued.p99_ms:.1f} | {r.welcome.p99_ms:.1f} | "
            f"{r.server_cpu_us_per_question:.0f} + {r.worker_cpu_us_per_question:.0f} | "
            f"{r.loadgen_cpu_pct:.0f} | {r.foreign_cpu_pct:.0f} | "
            f"{'pass' if r.passed else 'FAIL'}: {r.verdict} |"
        )
    return "\n".join(lines)


def server_logs_markdown(result: SuiteResult) -> str:
    """Warnings and errors the servers logged, per target and scenario."""
    lines = []
    for name, target in result.targets.items():
        for scenario, outcome in target.scenarios.items():
            log = outcome.server_log
            if log is None or not (log.warnings or log.errors or log.unstructured):
                continue
            events = ", ".join(f"`{k}` ×{v}" for k, v in log.events.items())
            lines.append(
                f"- {name}/{scenario}: {log.errors} errors, {log.warnings} warnings"
                + (f" ({events})" if events else "")
                + (f", {log.unstructured} unstructured stderr lines" if log.unstructured else "")
            )
    return "\n".join(lines) or "- no warnings or errors in any server log"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="Render a recorded suite run."
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="also draw the latency plot")
    args = parser.parse_args(argv)
    result = read_json(args.file)
    dirty = " + uncommitted changes" if result.git_dirty else ""
    print(
        f"run {result.started_at} .. {result.finished_at}: `{result.command}` "
        f"(commit {result.git_commit or '?'}{dirty})\n"
    )
    print("```\n" + summary_table(result) + "\n```\n")
    print(steps_markdown(result))
    print()
    print(independent_markdown(result))
    print()
    print(bot_heavy_markdown(result))
    print()
    print(server_logs_markdown(result))
    if args.plot is not None:
        why_not = plot_latency(result, args.plot)
        if why_not:
            print(f"\nplot skipped: {why_not}")


if __name__ == "__main__":
    main()
