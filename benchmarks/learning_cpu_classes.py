"""The tiny recipe's learning proof on every CPU class, in one run on one machine: seeds × kernel classes.

Each cell is one `python -m training.refresh --recipe training/recipes/tiny.yaml` (data, stand-in models,
both stages, the held-out evaluation through `Assistant`) in its own process, whose environment picks the
kernels torch, MKL and oneDNN use:

- native: whatever this CPU's libraries choose (AVX-512, VNNI, AMX on a recent Xeon; AVX2 on AMD EPYC)
- avx2: `inference.measuring.AVX2_KERNELS` (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA,
  FBGEMM_ENABLE_INSTRUCTIONS), the AVX2 class on an AVX-512 machine
- with --each-setting, seed 0 also runs under each of those settings alone, to show which one moves it

Reported per cell: accuracy per kind of held-out question after training, stage 2's held-out loss, the
same base models untrained (fresh projector, no adapter), and the time; then the lowest accuracy per
kind over all cells against the bars the test holds it to (`training.shapes.LEARNING_BARS`). On an AVX2-only CPU the two
classes are the same kernels, so only native runs: the AVX-512 class needs an AVX-512 machine.

    python benchmarks/learning_cpu_classes.py                  # seeds 0 1 2 × native, avx2: about 12 min
    python benchmarks/learning_cpu_classes.py --each-setting   # and seed 0 under each setting alone

The table is printed and written to benchmarks/RESULTS.md (replacing the previous run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.measuring import AVX2_KERNELS, RESULTS, cpu_description, cpu_model_and_flags, write_section  # noqa: E402
from training.shapes import LEARNING_BARS  # noqa: E402

HEADING = "### Learning on every CPU class"
KINDS = ("colour", "position", "shape")
SETTINGS = {  # each of AVX2_KERNELS alone
    f"{name} only": {name: value} for name, value in AVX2_KERNELS.items()
}


def run_cell(seed: int, workdir: Path) -> dict:
    """In the child process: the tiny refresh, then the untrained baseline; the environment set by the parent."""
    from tests.speedrun import untrained_accuracy
    from training import refresh
    from training.refresh.recipe import RECIPES
    from training.shapes import accuracy_by_kind

    started = time.perf_counter()
    result = refresh.main(["--recipe", str(RECIPES / "tiny.yaml"), "--workdir", str(workdir), "--seed", str(seed)])
    seconds = time.perf_counter() - started
    if {row["status"] for row in result["rows"]} != {"ran"}:
        raise SystemExit(f"a stage did not run: {result['rows']}")
    report = json.loads((workdir / "eval" / "held_out.json").read_text())
    return {
        "trained": accuracy_by_kind(report),
        "loss": report["loss"],
        "untrained": untrained_accuracy(workdir, seed),
        "seconds": seconds,
        "cpu": cpu_description(),
    }


def classes(each_setting: bool) -> dict[str, dict[str, str]]:
    """Kernel classes to run, by name, as the environment each needs."""
    _, flags = cpu_model_and_flags()
    chosen = {"native": {}}
    if "avx512f" in flags:  # on an AVX2-only CPU "avx2" is native again
        chosen["avx2"] = AVX2_KERNELS
        if each_setting:
            chosen.update(SETTINGS)
    return chosen


def percent(value: float) -> str:
    return f"{100 * value:.0f}"


def report(cells: list[dict], command: str, threads: int, minutes: float) -> str:
    lines = [
        f"{HEADING} ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{command}` on {cpu_description()}, {os.cpu_count()} cores, {threads} "
        f"threads per run, one run at a time; the whole benchmark took {minutes:.0f} min. Accuracy on the 90 held-out "
        "questions (30 per kind) after training; untrained: the same base models with a fresh projector and no "
        "adapter.",
        "",
        "| seed | kernels | colour | position | shape | stage 2 held-out loss | untrained colour / position / shape | "
        "refresh time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        trained, untrained = cell["trained"], cell["untrained"]
        lines.append(
            f"| {cell['seed']} | {cell['kernels']} | "
            + " | ".join(f"{percent(trained[kind])} %" for kind in KINDS)
            + f" | {cell['loss']:.4f} | "
            + " / ".join(percent(untrained[kind]) for kind in KINDS)
            + f" % | {cell['seconds']:.0f} s |"
        )
    lowest = {kind: min(cell["trained"][kind] for cell in cells) for kind in KINDS}
    lines += [
        "",
        "Lowest over all runs: "
        + ", ".join(f"{kind} {percent(lowest[kind])} % (test bar {percent(LEARNING_BARS[kind])} %)" for kind in KINDS)
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run (CPU Basic has 2 vCPUs)")
    parser.add_argument("--each-setting", action="store_true", help="seed 0 under each kernel setting alone too")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file the table is written to")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # the seed, in a child process
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_cell(args.child, args.workdir)))
        return []
    print(cpu_description(), flush=True)
    started, cells = time.perf_counter(), []
    plan = [(seed, name, env) for name, env in classes(False).items() for seed in args.seeds]
    plan += [(args.seeds[0], name, env) for name, env in classes(args.each_setting).items() if name in SETTINGS]
    with tempfile.TemporaryDirectory(prefix="learning-") as tmp:
        for seed, name, env in plan:
            print(f"seed {seed}, {name} kernels ...", flush=True)
            workdir = Path(tmp) / f"{name.replace(' ', '-')}-{seed}"
            child_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", **env}
            for variable in AVX2_KERNELS:  # a class is exactly its settings, whatever the caller's environment
                if variable not in env:
                    child_env.pop(variable, None)
            command = [sys.executable, __file__, "--child", str(seed), "--workdir", str(workdir)]
            done = subprocess.run(command, env=child_env, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"seed {seed}, {name} failed:\n{done.stderr[-3000:]}")
            cell = {"seed": seed, "kernels": name, **json.loads(done.stdout.strip().splitlines()[-1])}
            print(
                "  " + ", ".join(f"{kind} {percent(cell['trained'][kind])} %" for kind in KINDS),
                f"loss {cell['loss']:.4f}, {cell['seconds']:.0f} s",
                flush=True,
            )
            cells.append(cell)
    command = " ".join(["python benchmarks/learning_cpu_classes.py", *(argv if argv is not None else sys.argv[1:])])
    table = report(cells, command, args.threads, (time.perf_counter() - started) / 60)
    print(table)
    write_section(table, HEADING, args.results)
    return cells


if __name__ == "__main__":
    main()
