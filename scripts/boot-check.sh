#!/usr/bin/env bash
# labbook's boot check: boots the user-data labbook renders in a real Debian 13 VM (QEMU, no
# KVM needed) with cloud-init, and logs in to it.
#
# 1. A small VM image (Debian 13 with cloud-init, OpenSSH, sudo and a kernel; password SSH
#    logins off as on Ubuntu's cloud images) is made once with debootstrap and cached in
#    /var/cache/labbook/vm/ (scripts/boot-check/image.sh).
# 2. labbook's real pipeline (labbook run all) provisions two bookings of 3 users (2 per
#    instance, so 2 instances each) against moto, one with LABBOOK_BOOTSTRAP=ssh and one with
#    jupyterhub; each instance's user-data is read back from moto, the passwords from the
#    emails in maildev (scripts/boot-check/labdata.py). It uses its own database and RabbitMQ
#    vhost and removes them, its instances and its emails at the end.
# 3. Instance 0 of each booking boots under QEMU from a NoCloud seed, with user-mode networking
#    that reaches nothing (restrict=on) but SSH forwarded from 127.0.0.1.
# 4. ssh: the trainees of instance 0 log in with their emailed passwords and have no sudo; the
#    admin logs in and uses sudo with its password; a wrong password and a trainee of
#    instance 1 are refused; cloud-init is done; /etc/shadow holds the user-data's hashes.
#    jupyterhub: the installer cannot be downloaded, and the console says
#    `labbook-bootstrap: failed: ...` within a bounded time.
#    baked: the jupyterhub user-data again, on a stand-in for a baked image on EC2 (image.sh):
#    the bootstrap takes its fast path (`labbook-baked: ...`), fetches no package or installer,
#    reads its address from an IMDSv2 stand-in, installs the pinned certbot from the host's copy
#    of its wheels (hashes checked), gets a certificate for the address from an ACME server on
#    the host (Debian's pebble: acme.sh), gives TLJH exactly the booking's logins and the
#    certificate, and reports `labbook-bootstrap: ok`; the machine's port 443 then serves that
#    certificate, verified for the address up to pebble's root.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
HERE=$REPO/scripts/boot-check

usage() {
  cat <<'EOF'
Usage: scripts/boot-check.sh [--only ssh|jupyterhub|baked] [--image-only] [--keep] [--help]

Boots the cloud-init user-data labbook renders in a Debian 13 VM under QEMU (TCG, no KVM)
and checks it: with LABBOOK_BOOTSTRAP=ssh the trainees and the admin log in over SSH with the
passwords labbook emailed (and only they, and only the admin has sudo); with
LABBOOK_BOOTSTRAP=jupyterhub and no way out to the internet, the bootstrap reports its
failure on the serial console; the same user-data on a stand-in for a baked image takes the
fast path (nothing fetched but certbot's pinned wheels), gets a certificate for its address
from an ACME server on the host (pebble), gives TLJH exactly the booking's logins and the
certificate, reports "ok" and serves HTTPS verified for its address. Prints the image build
time, each boot's times (report, certificate, login or failure) and the total. Exits non-zero,
saying which check failed, on any failure.

The machines boot at once. On 2 cores without KVM: the image takes about 2.5 minutes to make
(once), the ssh machine about 2 minutes to its first login, the baked one about 3 minutes to
its report (its certificate step about 1 minute), the jupyterhub one about 5.5 minutes to its
failure report (its package and download retries alone sleep about 180 s); about 6 minutes in
all with the image cached.

Runs as root (debootstrap, chroot, apt-get for missing tools: qemu-system-x86, debootstrap,
genisoimage, sshpass, socat, openssl, pebble). Uses the services of scripts/services.sh
(PostgreSQL, RabbitMQ, moto, maildev; started if down) with its own database and vhost. The
image's packages and certbot's wheels are fetched once, from Debian's mirror and PyPI; the
checks send nothing beyond 127.0.0.0/8.

Options:
  --only MODE    check one machine only: ssh, jupyterhub or baked (about 2.5 minutes each
                 but jupyterhub's 5.5)
  --image-only   make (or find cached) the VM image, then stop
  --keep         keep the work directory (user-data, seeds, console logs) after success;
                 it is always kept after a failure
  --help         this text

Environment:
  LABBOOK_BIN_DIR            prebuilt labbook binaries, e.g. target/debug after
                             scripts/test.sh (else: cargo build --bins --locked)
  LABBOOK_VM_CACHE           where the VM image is cached          (/var/cache/labbook/vm)
  LABBOOK_VM_MIRROR          Debian mirror for the image           (apt's first, else deb.debian.org)
  LABBOOK_BOOT_TIMEOUT       seconds from QEMU's start to the      (900)
                             bootstrap's report on the console
  LABBOOK_BOOT_CHECK_WORK    work directory                        (a new /tmp/labbook-boot-check.*)
  MOTO_PORT, MAILDEV_WEB_PORT  as for scripts/services.sh          (5000, 1080)
EOF
}

say() { printf '==> %s\n' "$*" >&2; }
FAILURE=""
die() {
  FAILURE=$*
  printf 'boot-check: FAILED: %s\n' "$*" >&2
  exit 1
}
pass() { printf '  ok   %s\n' "$*" >&2; }

# with_progress WHAT LOG COMMAND...: runs COMMAND with its output in LOG, saying every 30 s
# that it still runs; returns its exit code.
with_progress() {
  local what=$1 log=$2 pid t0 next=30 code=0
  shift 2
  t0=$(date +%s)
  "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [ $(($(date +%s) - t0)) -ge "$next" ]; then
      say "  $what: $next s so far"
      next=$((next + 30))
    fi
  done
  wait "$pid" || code=$?
  return "$code"
}

apt_updated=""
need_debian_packages() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  say "installing $* (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need_tools() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  command -v qemu-img >/dev/null || missing+=(qemu-utils)
  command -v genisoimage >/dev/null || missing+=(genisoimage)
  command -v sshpass >/dev/null || missing+=(sshpass)
  command -v socat >/dev/null || missing+=(socat)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v pebble >/dev/null || missing+=(pebble)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  command -v ssh >/dev/null || missing+=(openssh-client)
  command -v psql >/dev/null || missing+=(postgresql-client)
  if [ ${#missing[@]} -gt 0 ]; then need_debian_packages "${missing[@]}"; fi
  # Debian's qemu-system-x86 may replace a newer qemu-utils (from backports) and remove it.
  command -v qemu-img >/dev/null || need_debian_packages qemu-utils
  python3 -c 'import boto3' 2>/dev/null ||
    die "python3 cannot import boto3 (it comes with moto: run scripts/services.sh)"
}

# shellcheck source=scripts/boot-check/image.sh
. "$HERE/image.sh"
# shellcheck source=scripts/boot-check/pipeline.sh
. "$HERE/pipeline.sh"
# shellcheck source=scripts/boot-check/acme.sh
. "$HERE/acme.sh"
# shellcheck source=scripts/boot-check/vm.sh
. "$HERE/vm.sh"
# shellcheck source=scripts/boot-check/checks.sh
. "$HERE/checks.sh"

KEEP=""
IMAGE_ONLY=""
MODES=(ssh jupyterhub baked)
while [ $# -gt 0 ]; do
  case $1 in
  --only)
    case ${2:-} in
    ssh | jupyterhub | baked) MODES=("$2") ;;
    *) die "--only takes ssh, jupyterhub or baked" ;;
    esac
    shift
    ;;
  --image-only) IMAGE_ONLY=1 ;;
  --keep) KEEP=1 ;;
  -h | --help)
    usage
    exit 0
    ;;
  *)
    usage >&2
    exit 2
    ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and apt-get need it)"
T_START=$(date +%s)
need_tools
image_ensure
if [ -n "$IMAGE_ONLY" ]; then exit 0; fi

# One check at a time on a machine: they share the database, vhost and installation names.
exec 6>"$VM_CACHE/.run.lock"
flock -n 6 || die "another boot check is running (lock: $VM_CACHE/.run.lock)"
umask 077 # the work directory holds the trainees' passwords
WORK="${LABBOOK_BOOT_CHECK_WORK:-$(mktemp -d /tmp/labbook-boot-check.XXXXXX)}"
mkdir -p "$WORK"
SUCCEEDED=""
on_exit() {
  local console
  set +e
  vm_stop_all
  acme_stop
  pipeline_cleanup
  if [ -n "$SUCCEEDED" ] && [ -z "$KEEP" ]; then
    rm -rf "$WORK"
    return
  fi
  if [ -z "$SUCCEEDED" ]; then
    for console in "$WORK"/vm-*/console.log; do
      [ -e "$console" ] || continue
      printf '\n--- the last lines of %s\n' "$console" >&2
      tr -d '\r' <"$console" | sed 's/\x1b\[[0-9;]*[A-Za-z]//g' | grep -a '[[:alnum:]]' | tail -n 25 >&2
    done
  fi
  say "work directory kept: $WORK (user-data, logins, seeds, console logs)"
  if [ -n "$FAILURE" ]; then printf '\nboot-check: FAILED: %s\n' "$FAILURE" >&2; fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# The user-data labbook renders, one booking per bootstrap mode (a baked machine boots the
# jupyterhub booking's).
bootstrap_of() { if [ "$1" = baked ]; then echo jupyterhub; else echo "$1"; fi; }
RENDER=()
for mode in "${MODES[@]}"; do
  want=$(bootstrap_of "$mode")
  [[ " ${RENDER[*]} " == *" $want "* ]] || RENDER+=("$want")
done
pipeline_binaries
pipeline_setup
for mode in "${RENDER[@]}"; do pipeline_render "$mode" "$WORK/$mode"; done
pipeline_cleanup

# The machines boot at once (each QEMU runs its one virtual CPU on a thread of its own).
for mode in "${MODES[@]}"; do
  if [ "$mode" = baked ]; then
    acme_start
    vm_boot baked "$WORK/jupyterhub/slot-0" "$IMAGE_BAKED_DISK" "$(acme_guestfwd)"
  else
    vm_boot "$mode" "$WORK/$mode/slot-0"
  fi
done
for mode in "${MODES[@]}"; do "check_${mode}_boot" "$mode" "$WORK/$(bootstrap_of "$mode")"; done
vm_stop_all
acme_stop

T_TOTAL=$(($(date +%s) - T_START))
SUCCEEDED=1
if [ "$IMAGE_BUILD_SECONDS" -gt 0 ]; then
  image="built in $IMAGE_BUILD_SECONDS s"
else
  image="cached ($(cat "$IMAGE_DIR/version"))"
fi
{
  printf '\nboot-check: all checks passed (times in seconds after QEMU started)\n'
  printf '  %-17s %s\n' "VM image" "$image"
  for mode in "${MODES[@]}"; do printf '  %-17s %s\n' "$mode boot" "${FIGURES[$mode]}"; done
  printf '  %-17s %s s\n' total "$T_TOTAL"
} >&2
