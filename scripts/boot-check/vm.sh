# shellcheck shell=bash
# The boot check's virtual machines: sourced by scripts/boot-check.sh. Each boots the cached
# image (image.sh) through a throw-away qcow2 overlay, with the kernel and initrd given to QEMU
# directly, a NoCloud seed (an ISO labelled cidata with the instance's user-data and
# meta-data), TCG (no KVM needed), the serial console in a file, and user-mode networking with
# restrict=on: the guest reaches nothing, not even the host, and only SSH is forwarded to it,
# from 127.0.0.1 (the baked stand-in also has HTTPS forwarded from 127.0.0.1, and reaches the
# host's ACME and wheel servers: acme.sh).

declare -A VM_PID VM_PORT VM_HTTPS_PORT VM_T0 VM_DIR VM_STAMPER
VM_MEMORY=1024

vm_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# vm_boot NAME SLOT_DIR [DISK [NIC_OPTIONS]]: starts QEMU for the instance whose user-data and
# meta-data are in SLOT_DIR, from DISK (the plain image by default), with NIC_OPTIONS added to
# its user network (",guestfwd=..."); returns at once. The guest's port 443 is forwarded from
# 127.0.0.1:VM_HTTPS_PORT[NAME].
vm_boot() {
  local name=$1 slot=$2 disk=${3:-$IMAGE_DISK} nic=${4:-} dir port https
  dir=$WORK/vm-$name
  rm -rf "$dir"
  mkdir -p "$dir"
  qemu-img create -q -f qcow2 -b "$disk" -F raw "$dir/disk.qcow2"
  genisoimage -quiet -output "$dir/seed.iso" -volid cidata -joliet -rock \
    "$slot/user-data" "$slot/meta-data"
  port=$(vm_free_port)
  https=$(vm_free_port)
  say "[$name] booting $(cat "$slot/instance-id")'s user-data under QEMU (TCG); SSH on 127.0.0.1:$port; console: $dir/console.log"
  qemu-system-x86_64 \
    -name "labbook-boot-check-$name" -machine pc -accel tcg -smp 1 -m "$VM_MEMORY" \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$IMAGE_KERNEL" -initrd "$IMAGE_INITRD" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1" \
    -drive "if=virtio,file=$dir/disk.qcow2,format=qcow2" \
    -drive "if=virtio,file=$dir/seed.iso,format=raw,readonly=on" \
    -nic "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:$port-:22,hostfwd=tcp:127.0.0.1:$https-:443$nic" \
    -device virtio-rng-pci \
    -serial "file:$dir/console.log" \
    >"$dir/qemu.log" 2>&1 </dev/null &
  VM_PID[$name]=$!
  VM_PORT[$name]=$port
  VM_HTTPS_PORT[$name]=$https
  VM_T0[$name]=$(date +%s)
  VM_DIR[$name]=$dir
  # Each console line with the second (after QEMU started) it was first seen: the machines boot
  # at once but are checked one after the other, so a check may read a line long after it came.
  python3 -u - "$dir/console.log" "${VM_T0[$name]}" >"$dir/console.times" 2>/dev/null <<'PY' &
import sys, time
path, t0, pos, buf = sys.argv[1], float(sys.argv[2]), 0, b""
while True:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:
        data = b""
    pos += len(data)
    *lines, buf = (buf + data).split(b"\n")
    now = int(time.time() - t0)
    for line in lines:
        print(now, line.decode("utf-8", "replace").replace("\r", ""))
    time.sleep(1)
PY
  VM_STAMPER[$name]=$!
}

# vm_seen_at NAME ERE: the second after QEMU started at which a console line first matched ERE.
vm_seen_at() {
  local at
  at=$(grep -aE -m1 "^[0-9]+ .*($2)" "${VM_DIR[$1]}/console.times" | cut -d' ' -f1)
  echo "${at:-$(vm_elapsed "$1")}"
}

vm_elapsed() { echo $(($(date +%s) - ${VM_T0[$1]})); }

# The console's last line with something readable on it, for progress lines.
vm_last_line() {
  tr -d '\r' 2>/dev/null <"${VM_DIR[$1]}/console.log" | sed 's/\x1b\[[0-9;]*[A-Za-z]//g' |
    grep -a '[[:alnum:]]' | tail -n1 | cut -c1-110
}

# vm_wait NAME ERE TIMEOUT WHAT: waits until a console line matches ERE; prints a progress
# line every 30 s; fails if QEMU exits or TIMEOUT seconds pass since the boot began. Sets
# VM_MATCH to the matching text (grep -o: other output may share the line, e.g. a login
# prompt).
vm_wait() {
  local name=$1 pattern=$2 timeout=$3 what=$4 log next
  log=${VM_DIR[$name]}/console.log
  next=$((($(vm_elapsed "$name") / 30 + 1) * 30))
  while :; do
    # Not `tr | grep -m1`: grep stops at the first match, tr dies of SIGPIPE when more than a
    # pipe's worth of the console follows it, and pipefail would make the match a failure.
    if VM_MATCH=$(grep -aoE -m1 "$pattern" < <(tr -d '\r' 2>/dev/null <"$log")); then
      return 0
    fi
    kill -0 "${VM_PID[$name]}" 2>/dev/null ||
      die "[$name] QEMU exited before $what (see $log and ${VM_DIR[$name]}/qemu.log)"
    if [ "$(vm_elapsed "$name")" -ge "$timeout" ]; then
      die "[$name] $what: not there $timeout s after QEMU started (console: $log)"
    fi
    if [ "$(vm_elapsed "$name")" -ge "$next" ]; then
      say "[$name] $(vm_elapsed "$name") s, waiting for $what; console: $(vm_last_line "$name")"
      next=$((next + 30))
    fi
    sleep 2
  done
}

vm_stop() {
  local name=$1 pid=${VM_PID[$1]:-}
  if [ -n "${VM_STAMPER[$name]:-}" ]; then
    kill "${VM_STAMPER[$name]}" 2>/dev/null || true
    unset "VM_STAMPER[$name]"
  fi
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  unset "VM_PID[$name]"
}

vm_stop_all() {
  local name
  for name in "${!VM_PID[@]}"; do vm_stop "$name"; done
}

# vm_ssh NAME USER PASSWORD COMMAND [STDIN]: one password login (no key, no agent) running
# COMMAND; its output in SSH_OUT, its errors in SSH_ERR, returns ssh's exit code.
vm_ssh() {
  local name=$1 user=$2 password=$3 command=$4 input=${5:-} code=0
  SSH_OUT=$(
    SSHPASS=$password timeout 120 sshpass -e ssh -p "${VM_PORT[$name]}" \
      -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
      -o PubkeyAuthentication=no -o GSSAPIAuthentication=no -o IdentityAgent=none \
      -o PreferredAuthentications=password -o NumberOfPasswordPrompts=1 \
      -o ConnectTimeout=30 "$user@127.0.0.1" "$command" \
      <<<"$input" 2>"$WORK/ssh.err"
  ) || code=$?
  SSH_ERR=$(tr -d '\r' <"$WORK/ssh.err")
  return "$code"
}
