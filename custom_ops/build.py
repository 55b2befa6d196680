#!/usr/bin/env python
"""Compile the kerasdet TensorFlow kernels (custom_ops/<family>/*.cc) into one op library.

Used by `make kernels` (in place, incremental) and by setup.py (into the wheel's build dir).
The flags come from the TensorFlow that is installed, so the library matches the runtime that
loads it; the version it was built for is written next to it and checked at load time.
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


def sources(suffix, exclude=()):
    found = []
    for family in sorted(os.listdir(HERE)):
        folder = os.path.join(HERE, family)
        if not os.path.isdir(folder) or family.startswith("_"):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(suffix) and not any(name.endswith(e) for e in exclude):
                found.append(os.path.join(folder, name))
    return found


def headers():
    out = []
    for dirpath, _, files in os.walk(HERE):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".h")]
    return out


def stale(target, deps):
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(os.path.getmtime(d) > t for d in deps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(ROOT, "kerasdet", "ops", "_lib"))
    parser.add_argument("--build-dir", default=os.path.join(HERE, "_build"))
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import tensorflow as tf

    cxx = os.environ.get("CXX", "g++")
    cflags = tf.sysconfig.get_compile_flags()
    lflags = tf.sysconfig.get_link_flags()
    common = ["-std=c++17", "-O2", "-fPIC", "-I", HERE] + cflags

    cc_files = sources(".cc", exclude=(".cu.cc",))
    if not cc_files:
        print("custom_ops: no kernel sources yet; nothing to build")
        return 0
    hdrs = headers()
    os.makedirs(args.out, exist_ok=True)

    def compile_one(src):
        rel = os.path.relpath(src, HERE)
        obj = os.path.join(args.build_dir, "cpu", rel[:-3] + ".o")
        if stale(obj, [src] + hdrs + [__file__]):
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            cmd = [cxx, "-c", src, "-o", obj] + common
            print("custom_ops: compiling", rel, flush=True)
            subprocess.run(cmd, check=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        objs = list(pool.map(compile_one, cc_files))

    lib = os.path.join(args.out, LIB_NAME)
    if stale(lib, objs):
        print("custom_ops: linking", LIB_NAME, flush=True)
        subprocess.run([cxx, "-shared", "-o", lib] + objs + lflags, check=True)
    with open(os.path.join(args.out, "_kerasdet_ops.json"), "w") as f:
        json.dump({"tensorflow": tf.__version__, "compiler": shutil.which(cxx) and cxx}, f)
    print("custom_ops: up to date ->", os.path.relpath(lib, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
