# shellcheck shell=bash
# The boot check's HTTPS services on the host, sourced by scripts/boot-check.sh: what a machine
# on EC2 reaches for its certificate, on 127.0.0.1 only.
#
# - EC2's instance metadata service (imds.py, IMDSv2 only), which gives the machine the public
#   address ACME_PUBLIC_IPV4 (a documentation address: EC2's public address is not on the
#   machine's interface either, and nothing is sent to it);
# - an ACME server: Debian's `pebble` (the RFC 8555 test server Let's Encrypt maintains), with
#   PEBBLE_VA_ALWAYS_VALID=1 (the guest's port 80 is not reachable from the host, so the
#   challenge is not validated; everything else of the order is real), no pauses before the
#   (skipped) validation and no rejected nonces. It serves its API with a certificate for
#   ACME_GUEST_ADDR signed by the boot check's own CA, which the baked stand-in trusts
#   (image.sh).
# - the pinned certbot's wheels (src/ec2/certbot-requirements.txt, the very file labbook puts in
#   the user-data), downloaded once from PyPI with their hashes checked (for every platform the
#   pins are for); those for CPython 3.13 on x86_64 (Debian 13) are served by python3's
#   http.server, where the stand-in's pip looks instead of PyPI (/etc/pip.conf, image.sh), still
#   checking every hash the user-data pins.
#
# The machine's user network is link-local (ACME_GUEST_NET), as EC2's metadata address is, so
# that QEMU's guestfwd (which takes addresses of the guest's network only) forwards the guest's
# 169.254.169.254:80 to imds.py, and ACME_GUEST_ADDR's ports to the ACME server
# (ACME_GUEST_PORT) and the wheels (WHEELS_GUEST_PORT); nothing else of the host.

ACME_GUEST_NET="net=169.254.0.0/16,host=169.254.0.2,dns=169.254.0.3,dhcpstart=169.254.0.15"
ACME_GUEST_ADDR=169.254.0.100
ACME_PUBLIC_IPV4=203.0.113.7
ACME_GUEST_PORT=14000
WHEELS_GUEST_PORT=8080
ACME_DIRECTORY_URL="https://$ACME_GUEST_ADDR:$ACME_GUEST_PORT/dir"
CERTBOT_REQUIREMENTS=$REPO/src/ec2/certbot-requirements.txt
ACME_PID="" WHEELS_PID="" IMDS_PID=""

# The wheels of the pinned requirements for every Python and machine the pins are for (CPython
# 3.12, Ubuntu 24.04's, and 3.13, Debian 13's, on x86_64 and aarch64): a pin whose hash matches
# no wheel of PyPI's would leave every such machine without certbot, so all four are fetched and
# checked, once per requirements file; the guest (CPython 3.13, x86_64) is served its own.
# Sets WHEELS_DIR.
acme_wheels_ensure() {
  local key root python machine glibc tags
  key=$(sha256sum "$CERTBOT_REQUIREMENTS" | cut -c1-16)
  root=$VM_CACHE/certbot-wheels-$key
  WHEELS_DIR=$root/cp313-x86_64
  if [ -e "$root/.done" ] && [ -d "$WHEELS_DIR" ]; then
    pass "certbot's pinned hashes match PyPI's wheels for CPython 3.12 and 3.13 on x86_64 and aarch64 (cached: $root)"
    return 0
  fi
  say "downloading certbot's pinned wheels from PyPI, hashes checked (once): $root"
  # Wheels of other requirements (or of an older layout) are not used any more.
  rm -rf "$VM_CACHE"/wheels-* "$VM_CACHE"/certbot-wheels-* "$VM_CACHE/pip-venv"
  python3 -m venv "$VM_CACHE/pip-venv" >/dev/null ||
    die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  for python in 3.12 3.13; do
    for machine in x86_64 aarch64; do
      tags=()
      for glibc in 2_34 2_28 2_17; do tags+=(--platform "manylinux_${glibc}_$machine"); done
      "$VM_CACHE/pip-venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        --require-hashes --only-binary :all: --python-version "$python" --implementation cp \
        --abi "cp${python/./}" "${tags[@]}" --platform "manylinux2014_$machine" \
        -r "$CERTBOT_REQUIREMENTS" -d "$root/cp${python/./}-$machine" \
        >"$VM_CACHE/pip-download.log" 2>&1 ||
        die "pip download of $CERTBOT_REQUIREMENTS for CPython $python on $machine failed: see $VM_CACHE/pip-download.log"
    done
  done
  rm -rf "$VM_CACHE/pip-venv"
  touch "$root/.done"
  pass "certbot's pinned hashes match PyPI's wheels for CPython 3.12 and 3.13 on x86_64 and aarch64"
}

# acme_wait WHAT COMMAND...: until COMMAND succeeds (30 s).
acme_wait() {
  local what=$1 _
  shift
  for _ in $(seq 1 60); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$what did not answer within 30 s"
}

# A connection to 127.0.0.1:PORT, and no request (the metadata stand-in logs each request, which
# the checks read).
acme_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts the metadata service, the ACME server and the wheel server; sets IMDS_HOST_PORT,
# ACME_HOST_PORT, ACME_MGMT_PORT and WHEELS_HOST_PORT (the host's ports QEMU forwards the guest
# to). IMDS_LOG has the metadata service's requests.
acme_start() {
  local dir=$WORK/acme
  command -v pebble >/dev/null || need_debian_packages pebble
  acme_wheels_ensure
  mkdir -p "$dir"
  ACME_HOST_PORT=$(vm_free_port)
  ACME_MGMT_PORT=$(vm_free_port)
  WHEELS_HOST_PORT=$(vm_free_port)
  IMDS_HOST_PORT=$(vm_free_port)
  IMDS_LOG=$dir/imds.log
  : >"$IMDS_LOG"
  say "instance metadata: imds.py on 127.0.0.1:$IMDS_HOST_PORT (the guest's 169.254.169.254:80), public-ipv4 $ACME_PUBLIC_IPV4"
  python3 "$HERE/imds.py" "$IMDS_HOST_PORT" "$ACME_PUBLIC_IPV4" "$IMDS_LOG" \
    >"$dir/imds.out" 2>&1 </dev/null &
  IMDS_PID=$!
  acme_wait "the instance metadata stand-in on 127.0.0.1:$IMDS_HOST_PORT" acme_port_open "$IMDS_HOST_PORT"
  cat >"$dir/pebble.json" <<EOF
{"pebble": {"listenAddress": "127.0.0.1:$ACME_HOST_PORT",
  "managementListenAddress": "127.0.0.1:$ACME_MGMT_PORT",
  "certificate": "$IMAGE_ACME_CA_DIR/server.pem", "privateKey": "$IMAGE_ACME_CA_DIR/server.key",
  "httpPort": 5002, "tlsPort": 5001, "ocspResponderURL": "",
  "externalAccountBindingRequired": false}}
EOF
  say "ACME server: pebble on 127.0.0.1:$ACME_HOST_PORT (the guest's $ACME_DIRECTORY_URL; log: $dir/pebble.log)"
  PEBBLE_VA_ALWAYS_VALID=1 PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 pebble -config "$dir/pebble.json" \
    >"$dir/pebble.log" 2>&1 </dev/null &
  ACME_PID=$!
  acme_wait "pebble at https://127.0.0.1:$ACME_HOST_PORT/dir" curl -fsS --max-time 2 \
    --cacert "$IMAGE_ACME_CA_DIR/ca.pem" -o /dev/null "https://127.0.0.1:$ACME_HOST_PORT/dir"
  say "certbot's wheels: http.server on 127.0.0.1:$WHEELS_HOST_PORT (the guest's http://$ACME_GUEST_ADDR:$WHEELS_GUEST_PORT/)"
  python3 -m http.server --bind 127.0.0.1 --directory "$WHEELS_DIR" "$WHEELS_HOST_PORT" \
    >"$dir/wheels.log" 2>&1 </dev/null &
  WHEELS_PID=$!
  acme_wait "the wheel server on 127.0.0.1:$WHEELS_HOST_PORT" curl -fsS --max-time 2 \
    -o /dev/null "http://127.0.0.1:$WHEELS_HOST_PORT/"
}

# QEMU's user-network options that take the guest to them.
acme_guestfwd() {
  printf ',%s' "$ACME_GUEST_NET"
  printf ',guestfwd=tcp:169.254.169.254:80-cmd:socat STDIO TCP:127.0.0.1:%s' "$IMDS_HOST_PORT"
  printf ',guestfwd=tcp:%s:%s-cmd:socat STDIO TCP:127.0.0.1:%s' \
    "$ACME_GUEST_ADDR" "$ACME_GUEST_PORT" "$ACME_HOST_PORT"
  printf ',guestfwd=tcp:%s:%s-cmd:socat STDIO TCP:127.0.0.1:%s' \
    "$ACME_GUEST_ADDR" "$WHEELS_GUEST_PORT" "$WHEELS_HOST_PORT"
}

# The ACME server's root (its issuing chain ends there): fetched from its management API.
acme_root() {
  curl -fsS --max-time 10 --cacert "$IMAGE_ACME_CA_DIR/ca.pem" \
    "https://127.0.0.1:$ACME_MGMT_PORT/roots/0" -o "$1" ||
    die "cannot read pebble's root certificate from its management API"
}

acme_stop() {
  local pid
  for pid in "$ACME_PID" "$WHEELS_PID" "$IMDS_PID"; do
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  ACME_PID="" WHEELS_PID="" IMDS_PID=""
}
