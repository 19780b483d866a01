# Sourced by scripts that debootstrap a Debian root (scripts/rabbitmq4.sh, scripts/boot-check).
# shellcheck shell=bash

# The first Debian mirror apt uses (one-line or deb822 sources), else deb.debian.org.
apt_mirror() {
  local m
  m=$(
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
      2>/dev/null |
      awk '/^deb /    { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /=/ && $i !~ /\]$/) { print $i; break } }
           /^URIs:/   { for (i = 2; i <= NF; i++) print $i }' |
      grep -E '^https?://[^ ]*/debian/?$' | head -n1
  ) || true
  echo "${m:-http://deb.debian.org/debian}"
}
