"""Experiment 9: learning curves of CNN-9 and SphereNet-9 on Fashion-MNIST (Hoiem et al., ICML 2021).

Trains the spec ``experiments/e9_learning_curves.yaml`` with ``torchsphere curves`` (resumable: finished runs are
reused, a killed run continues from its checkpoint), then writes ``docs/results/e9_learning_curves.md`` and its plot
``docs/results/e9_learning_curves.png``. The wall and CPU (process) time spent training is accumulated over sessions
in ``OUTPUT/timing.json``.

Commands::

    .venv/bin/python experiments/e9_learning_curves.py                 # train what is missing, fit, write the page
    .venv/bin/python experiments/e9_learning_curves.py --report-only   # train nothing: refit and rewrite the page

The generated page restates numbers by fixed rules (printed on the page); interpretation goes between the
``human-discussion`` markers, which regeneration keeps.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPEC = HERE / "e9_learning_curves.yaml"
DEFAULT_OUTPUT = ROOT / "reports" / "experiments" / "e9_learning_curves"
DEFAULT_PAGE = ROOT / "docs" / "results" / "e9_learning_curves.md"
COMMAND = ".venv/bin/python experiments/e9_learning_curves.py"
TIMING_FILE = "timing.json"
DISCUSSION = re.compile(r"<!-- human-discussion:start -->.*?<!-- human-discussion:end -->", re.S)
Z95 = 1.959963984540054


def machine() -> str:
    sys.path.insert(0, str(HERE))
    from run_all import machine as hardware

    return hardware()


def record_time(output: Path, wall: float, cpu: float) -> dict[str, Any]:
    from torchsphere.train.checkpoint import atomic_write_text

    path = output / TIMING_FILE
    timing = json.loads(path.read_text()) if path.is_file() else {"wall_s": 0.0, "cpu_s": 0.0, "sessions": []}
    if wall > 0:
        timing["wall_s"] += wall
        timing["cpu_s"] += cpu
        timing["sessions"].append({"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "machine": machine(),
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        atomic_write_text(path, json.dumps(timing, indent=2) + "\n")
    return timing


def verdicts(result: dict[str, Any]) -> list[str]:
    """Sentences that follow fixed rules from fit.json (printed with the rules on the page)."""
    lines = []
    for name, comp in result["comparisons"].items():
        base = comp["baseline"]
        de, se_e = comp["delta_e_N"], comp["delta_e_N_se"]
        db, se_b = comp["delta_beta_N"], comp["delta_beta_N_se"]
        if abs(de) > Z95 * se_e:
            e_word = "lower" if de < 0 else "higher"
            e_text = f"a {e_word} error at N than {base} (Δe_N = {de:+.2f} ± {se_e:.2f} points)"
        else:
            e_text = f"an error at N indistinguishable from {base}'s (Δe_N = {de:+.2f} ± {se_e:.2f} points)"
        if abs(db) > Z95 * se_b:
            b_text = (f"is {'more' if db > 0 else 'less'} data-reliant (Δβ_N = {db:+.2f} ± {se_b:.2f}): "
                      f"{'gains more' if db > 0 else 'gains less'} from more data")
        else:
            b_text = f"shows no detectable difference in data-reliance (Δβ_N = {db:+.2f} ± {se_b:.2f})"
        trusted = [c for c in comp["crossings"] if c["trusted"]]
        if trusted:
            c_text = "; its curve crosses " + base + "'s at " + ", ".join(
                f"n ≈ {c['n']:.0f} per class ({c['error']:.2f}%, {name if c['below'] == 'b' else base} lower above)"
                for c in trusted)
        else:
            others = len(comp["crossings"])
            c_text = (f"; no crossing within the measured range up to 4N" +
                      (f" ({others} outside it, not evidence)" if others else ""))
        lines.append(f"- **{name}** has {e_text} and {b_text}{c_text}.")
    return lines


def page(result: dict[str, Any], report_md: str, timing: dict[str, Any], old: str | None,
         image: str = "e9_learning_curves.png") -> str:
    """The Markdown section of docs/results.md for E9."""
    body = report_md.split("## Fits", 1)[1]  # the tables of the curves report, without its title and protocol
    body = body.replace("![learning curves](curves.png)", f"![E9 learning curves]({image})")
    body = body.replace("\n## ", "\n### ")
    protocol = report_md.split("## Protocol", 1)[1].split("## Fits", 1)[0].strip()
    discussion = (DISCUSSION.search(old).group(0) if old and DISCUSSION.search(old) else
                  "<!-- human-discussion:start -->\n(discussion to be written from the numbers above)\n"
                  "<!-- human-discussion:end -->")
    hours = timing.get("cpu_s", 0.0) / 60
    return "\n".join([
        "## E9: learning curves of CNN-9 and SphereNet-9 (Hoiem et al., ICML 2021)", "",
        "Does SphereConv help, and where? A single full-data accuracy cannot say whether an architecture needs less "
        "data. Following *Learning Curves for Analysis of Deep Networks* (Hoiem, Gupta, Li, Shlapentokh-Rothman, "
        "ICML 2021), each model is trained on class-stratified disjoint partitions of the training set at several "
        "sizes, its test error (percent) fitted as e(n) = α + η n^γ (n per class), and summarised by the error e_N "
        "at the full size N and the data-reliance β_N = −2ηγN^γ (quartering the data adds about β_N points of error, "
        "quadrupling it removes about β_N/2). How to read them: [docs/learning_curves.md](../learning_curves.md).", "",
        "### Protocol", "", protocol, "",
        f"Hardware: {timing['sessions'][-1]['machine'] if timing.get('sessions') else machine()}. Cost: "
        f"{timing.get('wall_s', 0.0) / 60:.1f} min wall, {hours:.1f} CPU-min (process time of the training process, "
        f"one thread, on a machine shared with other jobs), over {len(timing.get('sessions', []))} session(s). "
        f"Command: `{COMMAND}` (equivalently `python -m torchsphere curves --spec experiments/e9_learning_curves.yaml "
        "--output reports/experiments/e9_learning_curves`; the finished runs are committed, so it retrains nothing).",
        "", "### Fits" + body.rstrip(), "",
        "### What the numbers say (rules)", "",
        "Rules: a difference is stated when it exceeds 1.96 standard errors (SE of a difference = √(SE_a² + SE_b²), "
        "the fits taken as independent); a crossing counts only between the smallest measured size and 4N.", "",
        *verdicts(result), "",
        "### Discussion", "", discussion, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(SPEC), help="curves spec (default %(default)s)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="run folder (default %(default)s)")
    parser.add_argument("--page", default=str(DEFAULT_PAGE), help="Markdown page written (default %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; refit and rewrite the page")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from torchsphere.train.curves import CurvesSpec, run_curves

    output, page_path = Path(args.output), Path(args.page)
    spec = CurvesSpec.from_yaml(args.spec)
    wall, cpu = time.time(), time.process_time()
    result = run_curves(spec, output, quiet=args.quiet, refit_only=args.report_only)
    wall, cpu = time.time() - wall, time.process_time() - cpu
    timing = record_time(output, 0.0 if args.report_only else wall, cpu)
    old = page_path.read_text() if page_path.is_file() else None
    page_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(output / "curves.png", page_path.with_suffix(".png"))
    from torchsphere.train.checkpoint import atomic_write_text

    atomic_write_text(page_path, page(result, (output / "report.md").read_text(), timing, old,
                                         page_path.with_suffix(".png").name))
    print(f"wrote {page_path} and {page_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
