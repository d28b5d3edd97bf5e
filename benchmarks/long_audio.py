"""What a long upload costs the Space: the bounded decode against decoding the whole file, in one run.

A visitor can upload hours of low-bitrate audio within Gradio's 25 MB limit. This generates such a file
(speech-band noise in Opus at 6 kb/s, a minute encoded once and its packets repeated) and reads it in
a fresh process per method, reporting the time and the rise of that process's peak memory:

- whole file: `whisper.load_audio`, which decodes everything before the app cut it to 30 s (the old path)
- bounded: `inference.speech.load_audio`: the duration from the header, then only the first 30 s decoded

    python benchmarks/long_audio.py --hours 3

The table is printed and written to benchmarks/RESULTS.md (replacing the previous run of this benchmark).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "### Long audio uploads"
METHODS = {
    "whole file (whisper.load_audio)": "import whisper; samples = whisper.load_audio(path)[: 30 * 16000]",
    "bounded (inference.speech.load_audio)": "from inference.speech import load_audio; samples, _ = load_audio(path)",
}
PROBE = """
import json, sys, time
path = sys.argv[1]
import whisper, inference.speech  # imports first, so that only the reading is measured

def high_water_mark():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024

before, start = high_water_mark(), time.perf_counter()
{read}
print(json.dumps({{"seconds": time.perf_counter() - start, "rise": high_water_mark() - before}}))
"""


def make_opus(folder: Path, hours: float) -> Path:
    minute, long = folder / "minute.opus", folder / "long.opus"
    ffmpeg = ["ffmpeg", "-v", "error", "-y"]
    noise = ["-f", "lavfi", "-i", "anoisesrc=r=16000:a=0.3:d=60", "-ac", "1", "-c:a", "libopus", "-b:a", "6k"]
    subprocess.run([*ffmpeg, *noise, str(minute)], check=True)
    loops = round(hours * 60) - 1
    subprocess.run([*ffmpeg, "-stream_loop", str(loops), "-i", str(minute), "-c", "copy", str(long)], check=True)
    return long


def cpu() -> str:
    """The processor and the vector instruction sets that decide codec speed, as one line."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "amx_tile")
    return f"{model} ({', '.join(flag for flag in wanted if flag in flags) or 'no AVX2'})"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=3.0, help="length of the generated upload")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    environment = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    with tempfile.TemporaryDirectory() as folder:
        path = make_opus(Path(folder), args.hours)
        size = path.stat().st_size / 2**20
        results = {}
        for name, read in METHODS.items():
            probe = PROBE.format(read=read)
            run = subprocess.run(
                [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, env=environment, check=True
            )
            results[name] = json.loads(run.stdout)
    whole = results[next(iter(METHODS))]
    lines = [
        f"{SECTION}\n",
        f"`python benchmarks/long_audio.py --hours {args.hours:g}`: a {args.hours:g}-hour Opus upload "
        f"of {size:.1f} MB, on {cpu()}.\n",
        "| reading the upload | time | peak memory rise | speed-up over the whole file |",
        "|---|---|---|---|",
    ]
    for name, result in results.items():
        ratio = whole["seconds"] / result["seconds"]
        lines.append(f"| {name} | {result['seconds']:.2f} s | {result['rise'] / 2**20:,.0f} MB | {ratio:.0f}× |")
    table = "\n".join(lines) + "\n"
    print(table)
    text = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
    args.results.write_text(replace_section(text, table))
    return results


def replace_section(text: str, table: str) -> str:
    """`text` without this benchmark's previous table (up to the next ### heading), the new one at the end."""
    if SECTION in text:
        before, after = text.split(SECTION, 1)
        _, _, following = after.partition("\n### ")
        text = before.rstrip() + (f"\n\n### {following}" if following else "")
    return text.rstrip() + "\n\n" + table


if __name__ == "__main__":
    main()
