#!/usr/bin/env bash
# The system packages the tests use, installed with apt-get when this user may (root or passwordless
# sudo), after saying which on screen; otherwise the tests that need them say why they skip. Run by
# scripts/test.sh; nothing else installs system packages.
set -euo pipefail
# What each is for:
#  - openssh-server: the SSH device's tests start a real sshd on 127.0.0.1;
#  - qemu-user-static: `--device sim:PROFILE` runs ARM profiles' real aarch64 runtimes under QEMU.
NEED=""
[ -x /usr/sbin/sshd ] || NEED="$NEED openssh-server"
command -v qemu-aarch64-static >/dev/null || NEED="$NEED qemu-user-static"
#  - g++-aarch64-linux-gnu: the emulated ARM devices run a .pte with slm-export's runner built for aarch64.
command -v aarch64-linux-gnu-g++ >/dev/null || NEED="$NEED g++-aarch64-linux-gnu"
#  - g++: running a .pte builds slm-export's torch-free ExecuTorch runner (two short C++ files) once.
command -v g++ >/dev/null || command -v clang++ >/dev/null || NEED="$NEED g++"
if [ -n "$NEED" ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || (sudo -n true 2>/dev/null && echo "sudo -n") || echo none)
  if [ "$SUDO" != none ]; then
    echo "installing system packages for the tests:$NEED (apt-get${SUDO:+ via sudo})"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $NEED >/dev/null \
      || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $NEED >/dev/null; }
  fi
fi
if [ -n "$NEED" ] && { ! command -v apt-get >/dev/null || [ "${SUDO-none}" = none ]; }; then
  echo "not installing$NEED (no apt-get, or not root and no passwordless sudo): the tests that need them will skip"
fi
