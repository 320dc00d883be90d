"""``torchsphere ensemble``: rank a pool of trained runs by k-NN, fine-tune the best few, select an ensemble greedily.

The pipeline of Mustafa et al., *Deep Ensembles for Low-Data Transfer Learning* (arXiv 2010.06866, 2020), on one
downstream few-shot task (the choices that are torchsphere's, not the paper's, are listed in docs/ensembles.md):

1. draw the task: ``shots`` training and ``val_shots`` validation examples per class of ``classes`` of ``dataset``,
   seeded by ``draw``; the test split is every test example of those classes;
2. rank every pool member by the leave-one-out k-NN accuracy of its frozen penultimate features on the downstream
   training examples (training + validation pooled at 1 example per class);
3. fine-tune the ``top`` best with every point of the ``sweep`` (a fresh head, the training loop);
4. select greedily, on the validation cross-entropy of averaged probabilities, at most ``max_size`` picks with
   replacement from the ``top x sweep`` fine-tuned runs (Caruana et al., ICML 2004);
5. report, on validation and (once, after every choice) test: every fine-tuned run, the best single run, the best
   k-NN model at its best sweep point, the uniform average of the top models at their best sweep points, the greedy
   ensemble and, with ``baselines``, a random ensemble (pool members drawn uniformly, each at its best sweep point)
   and a seed-only ensemble (the best k-NN model fine-tuned with other seeds), both with as many distinct members as
   the greedy ensemble.

Everything lands in the output folder: ``spec.json``, ``knn.json``, ``finetune/MEMBER/POINT_seedS/`` (run folders
plus ``probs.pt``), ``results.json``, ``report.md`` and ``ensemble.png``. Rerunning the same command reuses what is
finished and resumes an interrupted fine-tuning run from its checkpoint; a folder holding another specification is
refused.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.subset import FewShotTask, fewshot_task
from ..train.checkpoint import atomic_write, atomic_write_text
from .features import extract_features, feature_layer
from .finetune import DEFAULT_SWEEP, SweepPoint, check_compatible, finetune, pool_config
from .knn import METRICS, WEIGHTINGS, rank_score
from .pool import PoolMember, find_pool, slug
from .selection import EnsembleSelection, accuracy, average, greedy_ensemble, nll

SPEC_FILE, KNN_FILE, RESULTS_FILE, REPORT_FILE, PLOT_FILE = ("spec.json", "knn.json", "results.json", "report.md",
                                                              "ensemble.png")
PROBS_FILE = "probs.pt"
RESUME_FREE = {"threads", "device", "quiet", "pool"}  # may differ between a run and its continuation


@dataclass
class EnsembleSpec:
    """Everything one ``torchsphere ensemble`` run depends on (see the module docstring)."""

    pool: list[str]
    classes: list[int]
    dataset: str = "fashion-mnist"
    shots: int = 5
    val_shots: int = 10
    draw: int = 0
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    limit_test: int | None = None
    top: int = 3
    sweep: list[list[float]] = field(default_factory=lambda: [[p.lr, p.steps] for p in DEFAULT_SWEEP])
    max_size: int = 5
    knn_k: int = 1
    metric: str = "cosine"
    weighting: str = "uniform"
    baselines: bool = False
    seed: int = 0
    threads: int | None = 1
    device: str = "cpu"
    quiet: bool = False

    def __post_init__(self) -> None:
        self.pool = [str(p) for p in self.pool]
        self.sweep = [[float(lr), int(steps)] for lr, steps in self.sweep]
        for name in ("top", "max_size", "knn_k", "shots", "val_shots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if isinstance(self.draw, bool) or not isinstance(self.draw, int) or self.draw < 0:
            raise ValueError(f"draw must be an int >= 0; got {self.draw!r}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {list(METRICS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {list(WEIGHTINGS)}")
        if not self.sweep:
            raise ValueError("sweep must hold at least one LR:STEPS point; got none")
        points = self.points()
        if len(set(points)) != len(points):
            raise ValueError(f"sweep repeats a point: {self.sweep}")

    def points(self) -> list[SweepPoint]:
        return [SweepPoint(lr, steps) for lr, steps in self.sweep]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _save_probs(path: Path, result: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(result, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _metrics(val_probs: torch.Tensor, test_probs: torch.Tensor, task: FewShotTask) -> dict[str, float]:
    return dict(val_acc=accuracy(val_probs, task.val_y), val_nll=nll(val_probs, task.val_y),
                test_acc=accuracy(test_probs, task.test_y), test_nll=nll(test_probs, task.test_y))


class _Runner:
    def __init__(self, spec: EnsembleSpec, output: Path) -> None:
        self.spec, self.out = spec, output
        self.members = find_pool(spec.pool)
        if spec.top > len(self.members):
            raise ValueError(f"top={spec.top} is larger than the pool of {len(self.members)} trained runs")
        self.task = fewshot_task(spec.dataset, spec.classes, spec.shots, val_shots=spec.val_shots, draw=spec.draw,
                                 data_dir=spec.data_dir, base_options=spec.dataset_options,
                                 limit_test=spec.limit_test)
        self.bar = None
        if not spec.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.members) + spec.top * len(spec.sweep), desc="ensemble", unit="task",
                            dynamic_ncols=True, leave=False)
        self.cache: dict[tuple[str, SweepPoint, int], dict[str, Any]] = {}

    def tick(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[-60:], refresh=False)
            self.bar.update(1)

    # ------------------------------------------------------------------ step 2: k-NN ranking
    def rank(self) -> list[dict[str, Any]]:
        from ..train.inference import load_run

        path = self.out / KNN_FILE
        done = {r["name"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
        rows = []
        for index, member in enumerate(self.members):
            if member.name in done and done[member.name]["path"] == str(member.path):
                rows.append(done[member.name])
                self.tick(f"kNN {member.name} (cached)")
                continue
            config, info = pool_config(member.path)
            check_compatible(member.path, info, self.task)
            model = load_run(member.path, "final", self.spec.device).model
            train_f = extract_features(model, self.task.train_x)
            val_f = extract_features(model, self.task.val_x)
            score, protocol = rank_score(train_f, self.task.train_y, val_f, self.task.val_y, k=self.spec.knn_k,
                                         metric=self.spec.metric, weighting=self.spec.weighting)
            upstream = config.dataset_kwargs.get("classes") if config.dataset == "subset" else None
            base = config.dataset_kwargs.get("base", config.dataset) if config.dataset == "subset" else config.dataset
            rows.append(dict(index=index, name=member.name, path=str(member.path), model=config.model,
                             operator=config.operator, head=config.head, family=_family(config.model),
                             upstream=f"{base}{'' if upstream is None else ' ' + str(list(upstream))}",
                             seed=config.seed, layer=feature_layer(model), feature_dim=int(train_f.shape[1]),
                             knn_acc=score, protocol=protocol))
            atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
            self.tick(f"kNN {member.name}")
        atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
        order = sorted(range(len(rows)), key=lambda i: (-rows[i]["knn_acc"], i))  # ties: pool order
        for rank, i in enumerate(order):
            rows[i]["rank"] = rank + 1
        return rows

    # ------------------------------------------------------------------ step 3: fine-tuning
    def finetuned(self, member: PoolMember, point: SweepPoint, seed: int) -> dict[str, Any]:
        key = (member.name, point, seed)
        if key in self.cache:
            return self.cache[key]
        folder = self.out / "finetune" / slug(member.name) / f"{point.label}_seed{seed}"
        probs_path = folder / PROBS_FILE
        if probs_path.is_file():
            result = torch.load(probs_path, map_location="cpu", weights_only=True)
            self.tick(f"{member.name} {point.label} seed {seed} (cached)")
        else:
            got = finetune(member.path, self.task, point, output=folder / "run", seed=seed,
                           data_dir=self.spec.data_dir, limit_test=self.spec.limit_test, threads=self.spec.threads,
                           device=self.spec.device)
            result = dict(val_probs=got.val_probs, test_probs=got.test_probs)
            _save_probs(probs_path, result)
            self.tick(f"{member.name} {point.label} seed {seed}")
        result = dict(result, member=member.name, lr=point.lr, steps=point.steps, seed=seed,
                      **_metrics(result["val_probs"], result["test_probs"], self.task))
        self.cache[key] = result
        return result

    def best_point(self, member: PoolMember) -> dict[str, Any]:
        """The sweep point with the lowest validation cross-entropy (ties: sweep order)."""
        runs = [self.finetuned(member, p, self.spec.seed) for p in self.spec.points()]
        return min(runs, key=lambda r: r["val_nll"])

    def extend(self, count: int) -> None:
        if self.bar is not None and count > 0:
            self.bar.total += count
            self.bar.refresh()


def _index(runs: list[dict[str, Any]], run: dict[str, Any]) -> int:
    return next(i for i, r in enumerate(runs) if r is run)  # by identity: the dicts hold tensors


def _family(model: str) -> str:
    return "sphere" if "sphere" in model else "plain"


def _method(runs: list[dict[str, Any]], picks: list[int], task: FewShotTask, note: str) -> dict[str, Any]:
    val = average(torch.stack([r["val_probs"] for r in runs]), picks)
    test = average(torch.stack([r["test_probs"] for r in runs]), picks)
    distinct = list(dict.fromkeys(picks))
    members = [f"{runs[i]['member']} @ lr {runs[i]['lr']:g}, {runs[i]['steps']} steps, seed {runs[i]['seed']}"
               for i in distinct]
    weights = [picks.count(i) / len(picks) for i in distinct]
    return dict(members=members, weights=weights, distinct=len(distinct), note=note, **_metrics(val, test, task))


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation with average ranks for ties (nan when undefined)."""
    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t, stable=True)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in set(v):  # average ranks of ties
            mask = t == value
            r[mask] = r[mask].mean()
        return r
    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else math.nan


def check_resumable(spec: EnsembleSpec, output: Path) -> None:
    """Writes ``spec.json``, or refuses a folder that holds a different specification."""
    path = output / SPEC_FILE
    now = spec.to_dict()
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in now if k not in RESUME_FREE and now[k] != saved.get(k))
        if diff:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
            raise ValueError(f"{str(output)!r} holds an ensemble run with another specification ({changes}); "
                             "choose another --output")
    atomic_write_text(path, json.dumps(now, indent=1) + "\n")


def run_ensemble(spec: EnsembleSpec, output: str | os.PathLike) -> dict[str, Any]:
    """Runs (or resumes) the pipeline of the module docstring into ``output``; returns the results (also
    ``results.json``) and writes ``report.md`` and ``ensemble.png``.

    Raises:
        ValueError: an empty pool, ``top`` larger than the pool, incompatible inputs, more examples per class than
            the data has, a folder holding another specification, bad options.
        FileNotFoundError: a pool path or the dataset's files are missing.
    """
    output = Path(output)
    runner = _Runner(spec, output)  # validates the pool and draws the task before anything is written
    output.mkdir(parents=True, exist_ok=True)
    check_resumable(spec, output)
    task = runner.task
    try:
        knn_rows = runner.rank()
        ranked = sorted(knn_rows, key=lambda r: r["rank"])
        by_name = {m.name: m for m in runner.members}
        top = [by_name[r["name"]] for r in ranked[:spec.top]]
        library = [runner.finetuned(m, p, spec.seed) for m in top for p in spec.points()]
        groups = [r["member"] for r in library]
        val_probs = torch.stack([r["val_probs"] for r in library])
        selection: EnsembleSelection = greedy_ensemble(val_probs, task.val_y, spec.max_size)
        test_stack = torch.stack([r["test_probs"] for r in library])
        test_trajectory = [nll(average(test_stack, selection.picks[:i + 1]), task.test_y)
                           for i in range(len(selection.picks))]
        best_single = min(range(len(library)), key=lambda i: library[i]["val_nll"])
        best_of = {m.name: runner.best_point(m) for m in top}
        methods: dict[str, dict[str, Any]] = {}
        methods["best-knn"] = _method(library, [_index(library, best_of[top[0].name])], task,
                                      "the top-1 k-NN model at its best sweep point (validation cross-entropy)")
        methods["best-single"] = _method(library, [best_single], task,
                                         "the fine-tuned run with the lowest validation cross-entropy")
        methods["topk-knn"] = _method(library, [_index(library, best_of[m.name]) for m in top], task,
                                      f"uniform average of the top-{spec.top} k-NN models at their best sweep points")
        methods["greedy"] = _method(library, selection.picks, task,
                                    f"greedy selection with replacement, at most {spec.max_size} picks")
        families = {r["name"]: r["family"] for r in knn_rows}
        plain = [i for i, r in enumerate(library) if families[r["member"]] == "plain"]
        if plain and len(plain) < len(library):
            sub = greedy_ensemble(val_probs[plain], task.val_y, spec.max_size)
            methods["greedy-plain-only"] = _method(library, [plain[i] for i in sub.picks], task,
                                                   "greedy over the same library without SphereNet members")
        if spec.baselines:
            size = len(selection.members)
            generator = torch.Generator().manual_seed(1_000_003 * spec.seed + spec.draw)
            drawn = [runner.members[int(i)] for i in torch.randperm(len(runner.members), generator=generator)[:size]]
            runner.extend(sum(len(spec.sweep) for m in drawn if m not in top) + size - 1)
            random_runs = [runner.best_point(m) for m in drawn]
            best_top = best_of[top[0].name]
            point = SweepPoint(best_top["lr"], best_top["steps"])
            seed_runs = [best_top] + [runner.finetuned(top[0], point, spec.seed + s) for s in range(1, size)]
            methods["random"] = _method(random_runs, list(range(size)), task,
                                        f"{size} pool members drawn uniformly, each at its best sweep point")
            methods["seed-only"] = _method(seed_runs, list(range(size)), task,
                                           f"the top-1 k-NN model at its best sweep point, {size} fine-tuning seeds")
    finally:
        if runner.bar is not None:
            runner.bar.close()
    tuned = list(runner.cache.values())
    fine_rows = [{k: v for k, v in r.items() if not k.endswith("_probs")} for r in tuned]
    names = list(dict.fromkeys(r["member"] for r in tuned if r["seed"] == spec.seed))
    best_val = {n: max(r["val_acc"] for r in tuned if r["member"] == n and r["seed"] == spec.seed) for n in names}
    knn_of = {r["name"]: r["knn_acc"] for r in knn_rows}
    results = dict(
        spec=spec.to_dict(),
        task=dict(dataset=spec.dataset, classes=list(spec.classes), class_names=task.classes, shots=spec.shots,
                  val_shots=spec.val_shots, draw=spec.draw, train=int(task.train_y.numel()),
                  val=int(task.val_y.numel()), test=int(task.test_y.numel())),
        knn=knn_rows, finetuned=fine_rows, methods=methods,
        greedy=dict(picks=[groups[i] + f" @ {library[i]['lr']:g}/{library[i]['steps']}" for i in selection.picks],
                    pick_indices=selection.picks, trajectory=selection.trajectory, test_trajectory=test_trajectory,
                    distinct_members=len(selection.members),
                    sphere_members=sum(families[groups[i]] == "sphere" for i in selection.members)),
        knn_vs_finetuned_spearman=_spearman([knn_of[n] for n in names], [best_val[n] for n in names]),
    )
    atomic_write_text(output / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
    atomic_write_text(output / REPORT_FILE, render_report(results))
    plot_ensemble(results, output / PLOT_FILE)
    return results


def _f(value: float, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.2f}" if pct else f"{value:.4f}"


def render_report(results: dict[str, Any]) -> str:
    """``report.md``: the k-NN table of the pool, the fine-tuned runs, the methods and the greedy picks."""
    t, spec = results["task"], results["spec"]
    lines = [f"# Ensemble from a pool of {len(results['knn'])} trained runs",
             "",
             f"Downstream: {t['dataset']} classes {t['classes']} ({', '.join(t['class_names'])}), {t['shots']} "
             f"training and {t['val_shots']} validation examples per class (draw {t['draw']}); {t['train']} / "
             f"{t['val']} / {t['test']} train / val / test examples. k-NN: k = {spec['knn_k']}, {spec['metric']}, "
             f"{spec['weighting']} votes, protocol {results['knn'][0]['protocol']}. Top {spec['top']} fine-tuned with "
             f"the sweep {[f'{lr:g}:{s}' for lr, s in spec['sweep']]} (LR:STEPS), greedy selection of at most "
             f"{spec['max_size']} picks on validation cross-entropy. The test split is used only for this report.",
             "",
             "## Pool ranked by leave-one-out k-NN accuracy",
             "",
             "| rank | member | model | operator | head | upstream | features | k-NN acc % | fine-tuned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["knn"], key=lambda r: r["rank"]):
        tuned = "yes" if r["rank"] <= spec["top"] else ""
        lines.append(f"| {r['rank']} | {r['name']} | {r['model']} | {r['operator'] or 'default'} | {r['head']} | "
                     f"{r['upstream']} | {r['layer']} ({r['feature_dim']}) | {_f(r['knn_acc'])} | {tuned} |")
    lines += ["", "## Fine-tuned runs", "",
              "| member | lr | steps | seed | val acc % | val CE | test acc % | test CE |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["finetuned"]:
        lines.append(f"| {r['member']} | {r['lr']:g} | {r['steps']} | {r['seed']} | {_f(r['val_acc'])} | "
                     f"{_f(r['val_nll'], False)} | {_f(r['test_acc'])} | {_f(r['test_nll'], False)} |")
    lines += ["", "## Methods", "", "| method | distinct members | val acc % | val CE | test acc % | test CE | what |",
              "|---|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | {m['distinct']} | {_f(m['val_acc'])} | {_f(m['val_nll'], False)} | "
                     f"{_f(m['test_acc'])} | {_f(m['test_nll'], False)} | {m['note']} |")
    g = results["greedy"]
    lines += ["", "## Greedy picks", "", "| pick | member @ lr/steps | val CE after the pick | test CE (reported) |",
              "|---|---|---|---|"]
    for i, (pick, v, te) in enumerate(zip(g["picks"], g["trajectory"], g["test_trajectory"])):
        lines.append(f"| {i + 1} | {pick} | {v:.4f} | {te:.4f} |")
    weights = results["methods"]["greedy"]
    lines += ["", "Members and weights: " + "; ".join(f"{m} ({w:.2f})" for m, w in zip(weights["members"],
                                                                                       weights["weights"])),
              f"Spearman correlation of k-NN accuracy and best fine-tuned validation accuracy over the fine-tuned "
              f"members: {results['knn_vs_finetuned_spearman']:.3f}" if not math.isnan(
                  results["knn_vs_finetuned_spearman"]) else "Spearman correlation: — (fewer than 3 members)", ""]
    return "\n".join(lines)


def plot_ensemble(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Two panels: k-NN accuracy of every pool member (fine-tuned ones highlighted); the greedy trajectory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["knn"], key=lambda r: r["rank"])
    top = results["spec"]["top"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    colors = ["tab:orange" if r["rank"] <= top else "tab:gray" for r in rows]
    axes[0].barh(range(len(rows)), [100 * r["knn_acc"] for r in rows], color=colors)
    axes[0].set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set(xlabel="leave-one-out k-NN accuracy (%)", title=f"pool ranking (orange: top {top}, fine-tuned)")
    g = results["greedy"]
    picks = range(1, len(g["trajectory"]) + 1)
    axes[1].plot(picks, g["trajectory"], "o-", label="greedy, validation CE (minimised)")
    axes[1].plot(picks, g["test_trajectory"], "s--", label="greedy, test CE (reported)")
    single = results["methods"]["best-single"]
    axes[1].axhline(single["val_nll"], color="tab:blue", ls=":", lw=1, label="best single, validation")
    axes[1].axhline(single["test_nll"], color="tab:orange", ls=":", lw=1, label="best single, test")
    axes[1].set(xlabel="picks", ylabel="cross-entropy", title="greedy selection")
    axes[1].set_xticks(list(picks))
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
