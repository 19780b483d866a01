# shellcheck shell=bash
# The boot check's VM image, sourced by scripts/boot-check.sh: a Debian 13 (trixie) root made
# with debootstrap, with a kernel, cloud-init, OpenSSH and sudo, turned into an ext4 disk image
# (mkfs.ext4 -d, no loop mount) plus the kernel and initrd that QEMU boots directly.
#
# Like scripts/rabbitmq4.sh (whose own root this leaves alone): debootstrap --variant=minbase
# from the first Debian mirror apt uses, the rest with apt in a chroot where no service may
# start, everything cached outside the checkout. The image is made once per recipe version:
# bump IMAGE_RECIPE when anything in this file changes what the image holds.
#
# What it adds to a plain Debian, to look like a cloud image:
# - /etc/ssh/sshd_config.d/60-cloudimg-settings.conf with `PasswordAuthentication no`
#   (Ubuntu's cloud images have it), so the user-data must turn password logins on itself;
# - no SSH host keys and an empty machine-id (the first boot makes them);
# - cloud-init looks for a NoCloud seed only (a `cidata` disk), not for a cloud's metadata
#   service, and manages /etc/hosts (as Debian's cloud images do); the rest of cloud-init's
#   configuration is Debian's; systemd-networkd runs the network cloud-init writes;
# - curl and e2fsprogs, as on every cloud image (the JupyterHub bootstrap needs curl before
#   cloud-init's packages are in; cloud-init's resizefs needs resize2fs).
#
# A second disk from the same root stands in for a baked image (`labbook image build`) on EC2:
# - the marker /etc/labbook/baked as the bake writes it, JupyterHub's two services disabled as
#   the bake leaves them, and a `tljh-config` that writes each call to the console
#   (`boot-check tljh-config: ...`) and keeps the settings it is given; its `reload proxy`
#   restarts the proxy's stand-in, which serves what TLJH's proxy would with those settings:
#   /hub/health over HTTP, or over HTTPS with the certificate chain and key it was given;
# - the boot check's CA in the machine's trust store (the ACME server on the host serves its
#   API with a certificate it signed: acme.sh), and a pip that takes its wheels from the host
#   (/etc/pip.conf) instead of PyPI, still checking the hashes the user-data pins.
# The Littlest JupyterHub itself cannot be installed without the internet; what the check shows
# is the bootstrap's fast path under a real cloud-init and systemd: no package or installer
# fetched, the pinned certbot installed, a certificate for the address from a real ACME server,
# installed where TLJH reads it and served, exactly the booking's logins given to TLJH, the
# report.

IMAGE_RECIPE=4
IMAGE_SUITE=trixie
IMAGE_PACKAGES=(
  linux-image-amd64 initramfs-tools systemd-sysv udev dbus
  cloud-init openssh-server sudo curl ca-certificates python3 iproute2 procps less e2fsprogs
  openssl python3-venv
)
IMAGE_SIZE=4G

VM_CACHE="${LABBOOK_VM_CACHE:-/var/cache/labbook/vm}"
IMAGE_DIR="$VM_CACHE/$IMAGE_SUITE-r$IMAGE_RECIPE"
IMAGE_DISK="$IMAGE_DIR/disk.raw"
IMAGE_BAKED_DISK="$IMAGE_DIR/disk-baked.raw"
IMAGE_KERNEL="$IMAGE_DIR/vmlinuz"
IMAGE_INITRD="$IMAGE_DIR/initrd.img"
# The boot check's CA (trusted by the baked stand-in) and the ACME server's certificate from it.
IMAGE_ACME_CA_DIR="$IMAGE_DIR/acme-ca"
IMAGE_DONE="$IMAGE_DIR/.done"
IMAGE_BUILD_ROOT="$VM_CACHE/build-root"

source "$(dirname "${BASH_SOURCE[0]}")/../lib/apt-mirror.sh"

# Every mount under the build root, deepest first.
image_unmount() {
  local m
  [ -d "$IMAGE_BUILD_ROOT" ] || return 0
  awk -v r="$(realpath "$IMAGE_BUILD_ROOT")" '$2 == r || index($2, r "/") == 1 { print $2 }' \
    /proc/self/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}

image_mount() {
  local fs
  for fs in proc sys dev; do
    mkdir -p "$IMAGE_BUILD_ROOT/$fs"
    mountpoint -q "$IMAGE_BUILD_ROOT/$fs" && continue
    case $fs in
    proc) mount -t proc proc "$IMAGE_BUILD_ROOT/proc" ;;
    sys) mount -t sysfs sysfs "$IMAGE_BUILD_ROOT/sys" ;;
    dev) mount --bind /dev "$IMAGE_BUILD_ROOT/dev" ;;
    esac
  done
}

image_throw_away_build_root() {
  [ -e "$IMAGE_BUILD_ROOT" ] || return 0
  image_unmount
  rm -rf --one-file-system "$IMAGE_BUILD_ROOT"
}

image_in_root() {
  chroot "$IMAGE_BUILD_ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"
}

image_debootstrap() {
  local mirror
  mirror="${LABBOOK_VM_MIRROR:-$(apt_mirror)}"
  say "debootstrap --variant=minbase $IMAGE_SUITE from $mirror (log: $VM_CACHE/debootstrap.log)"
  with_progress debootstrap "$VM_CACHE/debootstrap.log" \
    debootstrap --variant=minbase "$IMAGE_SUITE" "$IMAGE_BUILD_ROOT" "$mirror" ||
    die "debootstrap failed: see $VM_CACHE/debootstrap.log"
  image_unmount # debootstrap may leave /proc or /sys mounted
}

image_apt_install() {
  image_in_root apt-get update &&
    image_in_root apt-get install -y --no-install-recommends "${IMAGE_PACKAGES[@]}"
}

image_install_packages() {
  local r=$IMAGE_BUILD_ROOT
  say "apt-get install ${IMAGE_PACKAGES[*]} (log: $VM_CACHE/apt.log)"
  # No service may start while packages are installed.
  printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
  chmod 755 "$r/usr/sbin/policy-rc.d"
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  image_mount
  with_progress "apt-get install" "$VM_CACHE/apt.log" image_apt_install ||
    die "apt-get install failed in the image root: see $VM_CACHE/apt.log"
  image_in_root apt-get clean
  image_unmount
  rm -f "$r/usr/sbin/policy-rc.d"
}

image_configure() {
  local r=$IMAGE_BUILD_ROOT
  printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$r/etc/fstab"
  printf 'localhost\n' >"$r/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
  # What Ubuntu's cloud images ship: password logins off until the user-data says otherwise.
  mkdir -p "$r/etc/ssh/sshd_config.d"
  printf 'PasswordAuthentication no\n' >"$r/etc/ssh/sshd_config.d/60-cloudimg-settings.conf"
  grep -q '^Include /etc/ssh/sshd_config.d/\*.conf' "$r/etc/ssh/sshd_config" ||
    die "the image's sshd_config does not include sshd_config.d: the recipe needs a look"
  cat >"$r/etc/cloud/cloud.cfg.d/90-labbook-boot-check.cfg" <<'EOF'
# labbook's boot check: the user-data comes on a NoCloud seed (a disk labelled cidata).
datasource_list: [ NoCloud, None ]
# As Debian's cloud images: the machine's own name resolves without DNS.
manage_etc_hosts: true
EOF
  # cloud-init writes the network configuration for systemd-networkd (there is neither
  # ifupdown nor netplan here), which must then run, as on Debian's cloud images.
  image_in_root systemctl enable systemd-networkd >/dev/null 2>&1 ||
    die "cannot enable systemd-networkd in the image root"
  # The guest's network is QEMU's user mode with restrict=on: nothing outside answers, its DNS
  # neither. A name lookup fails as it would on an instance without a route out.
  rm -f "$r/etc/resolv.conf"
  # First-boot state: the first boot makes the host keys (cloud-init) and the machine-id.
  rm -f "$r"/etc/ssh/ssh_host_*
  : >"$r/etc/machine-id"
  rm -f "$r/var/lib/dbus/machine-id"
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/lib/cloud/*
  rm -f "$r"/var/log/*.log "$r"/var/log/apt/*
}

image_assemble() {
  local r=$IMAGE_BUILD_ROOT kernel initrd
  kernel=$(find "$r/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n1)
  initrd=$(find "$r/boot" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -n1)
  [ -n "$kernel" ] && [ -n "$initrd" ] || die "no kernel or initrd in $r/boot"
  rm -rf "$IMAGE_DIR"
  mkdir -p "$IMAGE_DIR"
  cp "$kernel" "$IMAGE_KERNEL"
  cp "$initrd" "$IMAGE_INITRD"
  say "mkfs.ext4 -d: a $IMAGE_SIZE ext4 image from the root ($(du -sh --one-file-system "$r" | cut -f1) used)"
  truncate -s "$IMAGE_SIZE" "$IMAGE_DISK"
  mkfs.ext4 -q -F -L labbook-root -d "$r" "$IMAGE_DISK" ||
    die "mkfs.ext4 -d failed (e2fsprogs 1.43 or later is needed)"
  image_bake_stand_in
  say "mkfs.ext4 -d: the baked image's stand-in"
  truncate -s "$IMAGE_SIZE" "$IMAGE_BAKED_DISK"
  mkfs.ext4 -q -F -L labbook-root -d "$r" "$IMAGE_BAKED_DISK" ||
    die "mkfs.ext4 -d failed for the baked image's stand-in"
  printf 'recipe %s, %s, kernel %s, built %s\n' "$IMAGE_RECIPE" "$IMAGE_SUITE" \
    "$(basename "$kernel")" "$(date -u +%FT%TZ)" >"$IMAGE_DIR/version"
}

# What `labbook image build` leaves on an image, in the build root (after the plain disk is
# made from it), and what the check's stand-ins for the internet need: see the top of this file.
image_bake_stand_in() {
  local r=$IMAGE_BUILD_ROOT
  mkdir -p "$r/etc/labbook" "$r/usr/local/bin" "$r/usr/local/sbin" "$r/etc/systemd/system"
  printf 'labbook_version=boot-check\nholds=tljh (stand-in)\nbaked_at=%s\n' \
    "$(date -u +%FT%TZ)" >"$r/etc/labbook/baked"
  cat >"$r/usr/local/bin/tljh-config" <<'EOF'
#!/bin/sh
# The boot check's stand-in for The Littlest JupyterHub's tljh-config: says each call, keeps
# what `set` is given (one "key value" line each) for the proxy's stand-in, and restarts that
# on `reload proxy` as TLJH restarts its proxy.
printf 'boot-check tljh-config: %s\n' "$*" >/dev/console
state=/run/boot-check-tljh
case $1 in
set)
  { grep -v "^$2 " "$state" 2>/dev/null || true; printf '%s %s\n' "$2" "$3"; } >"$state.new"
  mv "$state.new" "$state"
  ;;
reload) if [ "${2:-}" = proxy ]; then systemctl restart traefik; fi ;;
esac
EOF
  cat >"$r/usr/local/sbin/boot-check-proxy" <<'EOF'
#!/usr/bin/python3
"""The boot check's stand-in for TLJH's proxy: /hub/health with the settings tljh-config kept,
over HTTPS on 443 with the certificate chain and key TLJH was given, or over HTTP on 80."""
import http.server, ssl

settings = {}
try:
    with open("/run/boot-check-tljh") as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition(" ")
            settings[key] = value
except FileNotFoundError:
    pass


class Hub(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        found = self.path == "/hub/health"
        body = b'{"status": "ok"}\n' if found else b"not found\n"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if settings.get("https.enabled") == "true":
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(settings["https.tls.cert"], settings["https.tls.key"])
    hub = http.server.ThreadingHTTPServer(("", 443), Hub)
    hub.socket = tls.wrap_socket(hub.socket, server_side=True)
else:
    hub = http.server.ThreadingHTTPServer(("", 80), Hub)
hub.serve_forever()
EOF
  chmod 755 "$r/usr/local/bin/tljh-config" "$r/usr/local/sbin/boot-check-proxy"
  cat >"$r/etc/systemd/system/jupyterhub.service" <<'EOF'
[Unit]
Description=the boot check's stand-in for TLJH's jupyterhub
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
EOF
  cat >"$r/etc/systemd/system/traefik.service" <<'EOF'
[Unit]
Description=the boot check's stand-in for TLJH's proxy (traefik)
[Service]
ExecStart=/usr/local/sbin/boot-check-proxy
[Install]
WantedBy=multi-user.target
EOF
  image_acme_ca
  install -D -m 0644 "$IMAGE_ACME_CA_DIR/ca.pem" "$r/usr/local/share/ca-certificates/labbook-boot-check-ca.crt"
  image_in_root update-ca-certificates >/dev/null 2>&1 ||
    die "update-ca-certificates failed in the image root"
  cat >"$r/etc/pip.conf" <<EOF
# The boot check: certbot's pinned wheels come from the host (scripts/boot-check/acme.sh).
[global]
no-index = true
find-links = http://$ACME_GUEST_ADDR:$WHEELS_GUEST_PORT/
trusted-host = $ACME_GUEST_ADDR
EOF
}

# The boot check's CA, and the ACME server's certificate from it (for the address the guest
# reaches it at, and 127.0.0.1 for the host): made with the image, whose stand-in trusts it.
image_acme_ca() {
  local d=$IMAGE_ACME_CA_DIR
  mkdir -p "$d"
  chmod 700 "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=labbook boot check CA" -keyout "$d/ca.key" -out "$d/ca.pem" \
    -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    >/dev/null 2>&1 || die "openssl could not make the boot check's CA"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=boot check ACME server" \
    -keyout "$d/server.key" -out "$d/server.csr" >/dev/null 2>&1 ||
    die "openssl could not make the ACME server's key"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -out "$d/server.pem" -extfile <(printf '%s\n' \
      "subjectAltName=IP:$ACME_GUEST_ADDR,IP:127.0.0.1" "extendedKeyUsage=serverAuth") \
    >/dev/null 2>&1 || die "openssl could not make the ACME server's certificate"
}

# The image of this recipe: made when missing (or left unfinished), else reused. Sets
# IMAGE_BUILD_SECONDS (0 when cached).
image_ensure() {
  local t0
  IMAGE_BUILD_SECONDS=0
  mkdir -p "$VM_CACHE"
  exec 7>"$VM_CACHE/.lock"
  flock 7
  if [ -e "$IMAGE_DONE" ]; then
    say "VM image (recipe $IMAGE_RECIPE) cached: $IMAGE_DIR ($(cat "$IMAGE_DIR/version"))"
    exec 7>&-
    return
  fi
  command -v debootstrap >/dev/null || need_debian_packages debootstrap
  say "building the VM image, recipe $IMAGE_RECIPE, in $VM_CACHE (once; several minutes)"
  t0=$(date +%s)
  image_throw_away_build_root
  # Images of other recipes are not used any more.
  find "$VM_CACHE" -mindepth 1 -maxdepth 1 -type d -name "$IMAGE_SUITE-r*" -exec rm -rf {} +
  image_debootstrap
  image_install_packages
  image_configure
  image_assemble
  image_throw_away_build_root
  touch "$IMAGE_DONE"
  IMAGE_BUILD_SECONDS=$(($(date +%s) - t0))
  say "VM image built in ${IMAGE_BUILD_SECONDS} s: $IMAGE_DIR ($(du -h "$IMAGE_DISK" | cut -f1) on disk)"
  exec 7>&-
}
