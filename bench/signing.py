"""Benchmark 6: release-bundle signing and verification throughput on a 500 MB bundle.

Five random-byte "weight" files of 100 MB each (``--mb`` in all) are written to a fresh
folder under /tmp, then, interleaved, 3 times each (medians):

* ``write_bundle``: the appliance's whole release path (``export.bundle.write_bundle``):
  copy every file into a staging folder while hashing it, fsync, sign with model-signing
  (which hashes every file again), verify the fresh bundle (a third hash), fsync the tree
  and rename. Its MB/s is bundle bytes / wall time.
* ``verify_bundle``: the check a site or ``fedward-serve`` runs: signature, then the
  SHA-256 of every file.
* ``sha256sum`` of the same 5 source files, and of the bundle's files (GNU coreutils, a
  subprocess, same run): the floor of "read and hash every byte once".
* ``openssl dgst -sha256`` of the source files (a subprocess): GNU coreutils 9.1's
  ``sha256sum`` does not use the CPU's SHA extensions (SHA-NI) while OpenSSL, and so
  Python's ``hashlib``, does; this row shows how much of the gap that is.
* ``hashlib`` SHA-256 in Python over the source files, 1 MiB reads (what
  ``verify_bundle`` does per file), to separate Python overhead from hashing.

The files sit in the page cache (the machine has far more RAM than 500 MB), so these are
CPU-bound figures; ``write_bundle``'s fsyncs do touch the disk. Everything under /tmp is
removed at the end, also on failure. Scaled for ~1-2 minutes on 2 cores: 3 repetitions.

    .venv/bin/python bench/signing.py [--mb 500] [--reps 3]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu

N_FILES = 5


def make_files(folder: Path, total_mb: int) -> dict[str, Path]:
    import numpy as np

    rng = np.random.default_rng(0)
    per_file = total_mb * 1_000_000 // N_FILES
    files = {}
    for i in range(N_FILES):
        path = folder / f"weights-{i}.bin"
        with open(path, "wb") as fh:
            left = per_file
            while left:
                n = min(left, 16 * 1024 * 1024)
                fh.write(rng.bytes(n))
                left -= n
        files[f"weights/part-{i}.bin"] = path
    return files


def sha256sum(paths: list[Path]) -> float:
    t = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, paths)], check=True, capture_output=True,
                   timeout=300)
    return time.perf_counter() - t


def openssl_sha256(paths: list[Path]) -> float | None:
    if shutil.which("openssl") is None:
        return None
    t = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", *map(str, paths)], check=True,
                   capture_output=True, timeout=300)
    return time.perf_counter() - t


def py_sha256(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(1024 * 1024):
                h.update(chunk)
        h.hexdigest()
    return time.perf_counter() - t


def _sha_ni() -> bool:
    try:
        return " sha_ni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _sha256sum_version() -> str:
    out = subprocess.run(["sha256sum", "--version"], capture_output=True, text=True,
                         check=False, timeout=10).stdout
    return out.splitlines()[0] if out else "sha256sum"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    bu.exit_on_sigterm()

    from export.bundle import write_bundle
    from export.bundle_keys import generate_release_key
    from export.bundle_verify import verify_bundle

    tmp = Path(tempfile.mkdtemp(prefix="fedward-signing-", dir="/tmp"))
    times: dict[str, list[float]] = {"write_bundle": [], "verify_bundle": [],
                                     "sha256sum (source files)": [],
                                     "sha256sum (bundle files)": [],
                                     "openssl dgst -sha256 (source files)": [],
                                     "hashlib sha256 (source files)": []}
    try:
        src = tmp / "src"
        src.mkdir()
        t = time.perf_counter()
        files = make_files(src, args.mb)
        gen_s = time.perf_counter() - t
        key = tmp / "release.pem"
        generate_release_key(key)
        pub = tmp / "release.pub.pem"
        sources = list(files.values())
        sha256sum(sources)  # warm the page cache and the binary
        for rep in range(args.reps):
            bundle = tmp / f"release-{rep}"
            t = time.perf_counter()
            write_bundle(out_dir=bundle, files=files, private_key=key,
                         model_card={"release_id": f"bench-{rep}", "task": "benchmark"})
            times["write_bundle"].append(time.perf_counter() - t)
            times["sha256sum (source files)"].append(sha256sum(sources))
            t = time.perf_counter()
            verified = verify_bundle(bundle_dir=bundle, public_key=pub)
            times["verify_bundle"].append(time.perf_counter() - t)
            assert len(verified.files) == N_FILES + 2  # weights, model_card.json and .md
            bundle_files = [bundle / name for name in files]
            times["sha256sum (bundle files)"].append(sha256sum(bundle_files))
            o = openssl_sha256(sources)
            if o is not None:
                times["openssl dgst -sha256 (source files)"].append(o)
            times["hashlib sha256 (source files)"].append(py_sha256(sources))
            shutil.rmtree(bundle)
        bundle_mb = sum(p.stat().st_size for p in sources) / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = bu.median(times["sha256sum (source files)"])
    rows, summary = [], {}
    for name, vals in times.items():
        if not vals:
            continue
        med = bu.median(vals)
        summary[name] = {"seconds": vals, "median_s": med, "mb_per_s": bundle_mb / med,
                         "time_vs_sha256sum": med / base}
        rows.append([name, bu.fmt(med, 2), f"{bundle_mb / med:.0f}", f"{med / base:.2f}x"])
    md = (
        f"{bundle_mb:.0f} MB in {N_FILES} random-byte files (page cache warm), median of "
        f"{args.reps}, interleaved. Ratio = time / time of `sha256sum` over the same source "
        "files in the same run (1.00x = one read-and-hash of every byte).\n\n"
        + bu.md_table(["operation", "median s", "MB/s", "time vs sha256sum"], rows)
        + f"\nCPU SHA extensions (sha_ni): {'yes' if _sha_ni() else 'no'}; "
          f"`{_sha256sum_version()}`.\n"
    )
    bu.write_results("signing", {"bundle_mb": bundle_mb, "files": N_FILES, "reps": args.reps,
                                 "generate_seconds": gen_s, "results": summary}, md)


if __name__ == "__main__":
    main()
