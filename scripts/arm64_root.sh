#!/usr/bin/env bash
# An arm64 Debian root with aarch64 wheels of the edge install (numpy, onnxruntime: this venv's versions), so
# that onnxruntime runs under qemu-aarch64 on an x86-64 host: xray-export --arm64-root DIR verifies the int8
# model on Arm kernels there (cortex-a72: NEON, no dot product; neoverse-n1: dot product), and so do the tests.
#
#   scripts/arm64_root.sh DIR        # needs root (debootstrap), Debian's mirror and PyPI; about a minute
#
# qemu-user passes the host's x86 /proc/cpuinfo through, where onnxruntime's CPU detection (pytorch/cpuinfo)
# finds no Arm core and dereferences NULL; with `qemu-aarch64 -L DIR` the root's own /proc/cpuinfo (a plain
# Cortex-A72 text, written here) is read instead. Instruction-set features come from the emulated CPU's
# HWCAP, not from that file.
set -euo pipefail
dir=${1:?usage: scripts/arm64_root.sh DIR}
py=${PYTHON:-python3}
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
versions=$("$py" -c 'import numpy, onnxruntime; print(f"numpy=={numpy.__version__} onnxruntime=={onnxruntime.__version__}")')
tmp="$dir.partial"
rm -rf "$tmp" && mkdir -p "$tmp"
debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$tmp/root" "$mirror" >/dev/null
for deb in "$tmp"/root/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
rm -rf "$tmp"/root/var/cache/apt/archives/*.deb
# shellcheck disable=SC2086
"$py" -m pip download --quiet --only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform any --python-version 3.11 -d "$tmp/wheels" $versions
for wheel in "$tmp"/wheels/*.whl; do "$py" -m zipfile -e "$wheel" "$tmp/root/site-packages"; done
rm -rf "$tmp/wheels"
mkdir -p "$tmp/root/proc"
for n in 0 1; do
  printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$n"
done > "$tmp/root/proc/cpuinfo"
rm -rf "$dir" && mv "$tmp" "$dir"
echo "arm64 root: $dir ($versions)"
