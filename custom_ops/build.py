#!/usr/bin/env python
"""Compile the kerasdet TensorFlow kernels (custom_ops/<family>/) into op libraries.

Used by `make kernels` (in place, incremental) and by setup.py (into the wheel's build dir).
The flags come from the TensorFlow that is installed, so the library matches the runtime that
loads it; the version it was built for is written next to it and checked at load time.

Rules, the same for every family folder (a folder starting with "_" is ignored):
  * ``*.cc`` except ``*.cu.cc``: op registrations and CPU kernels, compiled with g++ into
    ``_kerasdet_ops.so`` (the CPU library).
  * ``*.cu.cc``: CUDA kernels, compiled by nvcc (without TensorFlow headers: TF's pip headers do not
    compile under nvcc, so these files expose raw-pointer launchers). When nvcc is on PATH, every
    ``*.cc`` is compiled a second time with ``-DGOOGLE_CUDA=1`` (so ``#if GOOGLE_CUDA`` GPU kernel
    registrations are included) and linked with the CUDA objects into ``_kerasdet_ops_gpu.so``,
    which the loader prefers when TensorFlow sees a GPU. Without nvcc the GPU library is skipped
    with a message; with nvcc, a failing CUDA build is an error (exit status 1), so CI catches it.

Environment: CXX (default g++), NVCC (default: nvcc on PATH), KERASDET_CUDA=0 to skip the GPU
library, KERASDET_CUDA_ARCH (default "75,80": SASS for sm_75 and sm_80 plus PTX of the last one,
which newer GPUs JIT-compile; fewer architectures keep nvcc time bounded).
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIB_NAME = "_kerasdet_ops.so"
GPU_LIB_NAME = "_kerasdet_ops_gpu.so"
INFO_NAME = "_kerasdet_ops.json"
DEFAULT_CUDA_ARCH = "75,80"


def sources(suffix, exclude=()):
    """Files ending in `suffix` (and in none of `exclude`) of every family folder, sorted."""
    found = []
    for family in sorted(os.listdir(HERE)):
        folder = os.path.join(HERE, family)
        if not os.path.isdir(folder) or family.startswith("_"):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(suffix) and not any(name.endswith(e) for e in exclude):
                found.append(os.path.join(folder, name))
    return found


def headers(src):
    """Headers a source may include: those of its own family folder and of common/."""
    out = []
    for folder in {os.path.dirname(src), os.path.join(HERE, "common")}:
        if os.path.isdir(folder):
            out += [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".h")]
    return out


def stale(target, deps):
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(os.path.getmtime(d) > t for d in deps)


def cuda_arch_flags(spec):
    """KERASDET_CUDA_ARCH "75,80" -> SASS for each, plus PTX of the newest for forward compat."""
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in spec.split(",") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"custom_ops: KERASDET_CUDA_ARCH must be like '75,80', got {spec!r}")
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def find_nvcc():
    if os.environ.get("KERASDET_CUDA", "1") == "0":
        return None, "KERASDET_CUDA=0"
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        return None, "nvcc not found on PATH"
    return nvcc, None


def cuda_dirs(nvcc):
    """(include dir, lib dir) of the CUDA toolkit nvcc belongs to, as nvcc itself reports them
    (nvcc may be a wrapper script, so its own path does not tell)."""
    include = lib = None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ INCLUDES=") and include is None:
                first = line.split("=", 1)[1].strip().strip('"').split('" "')[0]
                include = first[2:] if first.startswith("-I") else None
            elif line.startswith("#$ LIBRARIES=") and lib is None:
                for part in line.split("=", 1)[1].split():
                    part = part.strip('"')
                    if part.startswith("-L") and not part.rstrip("/").endswith("stubs"):
                        lib = part[2:]
    except (OSError, subprocess.SubprocessError):
        pass
    root = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or os.path.dirname(
        os.path.dirname(os.path.realpath(nvcc)))
    return (include or os.path.join(root, "include"), lib or os.path.join(root, "lib64"))


def run(cmd, what):
    print("custom_ops:", what, flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "kerasdet", "ops", "_lib"))
    parser.add_argument("--build-dir", default=os.path.join(HERE, "_build"))
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-cuda", action="store_true", help="skip the GPU library")
    args = parser.parse_args(argv)

    import tensorflow as tf

    cxx = os.environ.get("CXX", "g++")
    cflags = tf.sysconfig.get_compile_flags()
    lflags = tf.sysconfig.get_link_flags()
    # TF's own headers use deprecated Status helpers; their warnings would bury ours.
    common = ["-std=c++17", "-O3", "-fPIC", "-Wall", "-Wno-deprecated-declarations",
              "-Wno-sign-compare", "-Wno-interference-size", "-I", HERE] + [f for f in cflags if f != "--std=c++17"]

    cc_files = sources(".cc", exclude=(".cu.cc",))
    cu_files = sources(".cu.cc")
    if not cc_files:
        print("custom_ops: no kernel sources yet; nothing to build")
        return 0
    os.makedirs(args.out, exist_ok=True)
    jobs = max(1, args.jobs)

    def compile_cc(src, variant, extra):
        rel = os.path.relpath(src, HERE)
        obj = os.path.join(args.build_dir, variant, rel[:-3] + ".o")
        if stale(obj, [src] + headers(src) + [__file__]):
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            run([cxx, "-c", src, "-o", obj] + common + extra, f"compiling {rel} ({variant})")
        return obj

    nvcc, no_gpu_reason = (None, "--no-cuda") if args.no_cuda else find_nvcc()
    arch = os.environ.get("KERASDET_CUDA_ARCH", DEFAULT_CUDA_ARCH)
    nvcc_flags = ["-std=c++17", "-O3", "-x", "cu", "-Xcompiler", "-fPIC", "-I", HERE,
                  "--expt-relaxed-constexpr", "-DGOOGLE_CUDA=1"] + (
                      cuda_arch_flags(arch) if nvcc else [])

    def compile_cu(src):
        rel = os.path.relpath(src, HERE)
        obj = os.path.join(args.build_dir, "cuda", rel[:-6] + ".cu.o")
        stamp_deps = [src] + headers(src) + [__file__]
        if stale(obj, stamp_deps) or _arch_changed(obj, arch):
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            run([nvcc, "-c", src, "-o", obj] + nvcc_flags, f"nvcc {rel} (sm {arch})")
            with open(obj + ".arch", "w") as f:
                f.write(arch)
        return obj

    tasks = [(compile_cc, (src, "cpu", [])) for src in cc_files]
    if nvcc:
        cuda_include, cuda_lib = cuda_dirs(nvcc)
        tasks += [(compile_cc, (src, "gpu", ["-DGOOGLE_CUDA=1", "-I", cuda_include]))
                  for src in cc_files]
        tasks += [(compile_cu, (src,)) for src in cu_files]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(fn, *a) for fn, a in tasks]
        errors = []
        for fut in futures:
            try:
                fut.result()
            except RuntimeError as err:
                errors.append(str(err))
    if errors:
        for e in errors:
            print("custom_ops: ERROR:", e, file=sys.stderr)
        return 1
    cpu_objs = [f.result() for f, (fn, a) in zip(futures, tasks) if fn is compile_cc and a[1] == "cpu"]

    # --no-undefined: a missing symbol (say, a launcher whose .cu.cc is absent) fails the build here
    # instead of failing at load time on a user's machine.
    lib = os.path.join(args.out, LIB_NAME)
    if stale(lib, cpu_objs):
        try:
            run([cxx, "-shared", "-o", lib] + cpu_objs + lflags + ["-Wl,--no-undefined"],
                f"linking {LIB_NAME}")
        except RuntimeError as err:
            print("custom_ops: ERROR:", err, file=sys.stderr)
            return 1
    write_info(args.out, tf.__version__, cxx, None, None)

    gpu_built = False
    if nvcc:
        gpu_objs = [f.result() for f, (fn, a) in zip(futures, tasks)
                    if (fn is compile_cc and a[1] == "gpu") or fn is compile_cu]
        gpu_lib = os.path.join(args.out, GPU_LIB_NAME)
        if stale(gpu_lib, gpu_objs):
            # The CUDA runtime is linked statically so the library has no libcudart.so dependency
            # of its own (TensorFlow's GPU wheel brings the driver API it needs at run time).
            try:
                run([cxx, "-shared", "-o", gpu_lib] + gpu_objs + lflags +
                    ["-L", cuda_lib, "-l:libcudart_static.a", "-ldl", "-lrt", "-lpthread",
                     "-Wl,--no-undefined"],
                    f"linking {GPU_LIB_NAME}")
            except RuntimeError as err:
                if os.path.exists(gpu_lib):
                    os.remove(gpu_lib)  # never leave a stale GPU library for the loader
                print("custom_ops: ERROR:", err, file=sys.stderr)
                return 1
        gpu_built = True
    else:
        print(f"custom_ops: skipping the CUDA kernels ({no_gpu_reason}); CPU library only")

    if gpu_built:
        write_info(args.out, tf.__version__, cxx, GPU_LIB_NAME, arch)
    print("custom_ops: up to date ->", os.path.relpath(lib, ROOT),
          "+ " + GPU_LIB_NAME if gpu_built else "")
    return 0


def write_info(out, tf_version, cxx, gpu_library, cuda_arch):
    """The build record the loader checks: which TensorFlow the libraries were built for."""
    with open(os.path.join(out, INFO_NAME), "w") as f:
        json.dump({"tensorflow": tf_version, "compiler": shutil.which(cxx) and cxx,
                   "gpu_library": gpu_library, "cuda_arch": cuda_arch}, f)


def _arch_changed(obj, arch):
    """True when `obj` was compiled for other CUDA architectures than asked now."""
    try:
        with open(obj + ".arch") as f:
            return f.read() != arch
    except OSError:
        return True


if __name__ == "__main__":
    sys.exit(main())
