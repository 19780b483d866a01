# shellcheck shell=bash
# The boot check's checks on the booted machines: sourced by scripts/boot-check.sh.

BOOT_TIMEOUT="${LABBOOK_BOOT_TIMEOUT:-900}"
# The bootstrap's report (src/ec2/userdata.rs): "ok", or the failed step and its exit code.
# A step's name may hold parentheses ("install the ACME client (certbot 5.8.0)").
REPORT_ERE='labbook-bootstrap: (ok|failed: .*\(exit [0-9]+\))'
CLOUD_INIT_DONE_ERE='Cloud-init v\. [^ ]+ finished at .*'
# labbook's readiness wait reads the console the same way (src/stages/provisioner/ready.rs):
# a line that ends with the "ok" report; the login prompt may come first on that line.
report_line_ends_with() {
  tr -d '\r' <"${VM_DIR[$1]}/console.log" | grep -a 'labbook-bootstrap: ' | tail -n1 |
    sed 's/[[:space:]]*$//' | grep -q "$2\$"
}

# Under `set -e`, `v=$(grep ... | ...)` ends the script when grep finds nothing, before the
# check can say what is missing: such assignments end with `|| true`, and the check that
# follows says what was not found.

# Each check's times, for the summary.
declare -A FIGURES

# read_logins SLOT_DIR: ADMIN=(user password), TRAINEES=(user password user password ...).
read_logins() {
  local role user password
  ADMIN=() TRAINEES=()
  while read -r role user password; do
    case $role in
    admin) ADMIN=("$user" "$password") ;;
    trainee) TRAINEES+=("$user" "$password") ;;
    esac
  done <"$1/logins"
  [ ${#ADMIN[@]} = 2 ] && [ ${#TRAINEES[@]} -ge 2 ] || die "no admin or trainee login in $1/logins"
}

# A login that must be refused: the password was checked and found wrong, or not accepted at
# all, and nothing else (a connection problem) went wrong.
expect_refused() {
  local name=$1 user=$2 password=$3 what=$4
  if vm_ssh "$name" "$user" "$password" true; then
    die "[$name] $what: the login succeeded"
  fi
  case $SSH_ERR in
  *"Permission denied"*) pass "$what: refused" ;;
  *) die "[$name] $what: failed, but not as a refused login: $SSH_ERR" ;;
  esac
}

# expect_sudo_refused NAME USER PASSWORD COMMAND STDIN: the login works and sudo says no
# (exit 1), as opposed to the login failing.
expect_sudo_refused() {
  local name=$1 user=$2 code=0
  vm_ssh "$@" || code=$?
  [ "$code" = 1 ] && [[ $SSH_ERR == *sudo* ]] ||
    die "[$name] $user: '$4' should be refused by sudo; exit $code: $SSH_OUT $SSH_ERR"
}

# The first password login after the boot, tried until sshd answers (it is restarted by
# cloud-init with the user-data's settings).
first_login() {
  local name=$1 user=$2 password=$3 deadline
  deadline=$(($(date +%s) + 120))
  until vm_ssh "$name" "$user" "$password" 'id -un'; do
    [ "$(date +%s)" -lt "$deadline" ] ||
      die "[$name] trainee $user cannot log in with the emailed password: $SSH_ERR"
    sleep 3
  done
  [ "$SSH_OUT" = "$user" ] || die "[$name] logged in as $user, but id -un says '$SSH_OUT'"
}

# The ssh bootstrap, on instance 0 of the booking in DIR.
check_ssh_boot() {
  local name=$1 slot0=$2/slot-0 slot1=$2/slot-1 i user password hash shadow code
  read_logins "$slot0"
  vm_wait "$name" "$REPORT_ERE" "$BOOT_TIMEOUT" "the bootstrap's report on the console"
  [ "$VM_MATCH" = "labbook-bootstrap: ok" ] || die "[$name] the console says: $VM_MATCH"
  FIG_SSH_REPORT=$(vm_elapsed "$name")
  say "[$name] console at $FIG_SSH_REPORT s: $VM_MATCH"
  report_line_ends_with "$name" "labbook-bootstrap: ok" ||
    die "[$name] the console's report line does not end with 'labbook-bootstrap: ok', which labbook's readiness wait needs"
  vm_wait "$name" "$CLOUD_INIT_DONE_ERE" "$BOOT_TIMEOUT" "cloud-init's final message"
  FIG_SSH_DONE=$(vm_elapsed "$name")
  say "[$name] cloud-init finished at $FIG_SSH_DONE s; logging in over SSH"

  first_login "$name" "${TRAINEES[0]}" "${TRAINEES[1]}"
  FIG_SSH_LOGIN=$(vm_elapsed "$name")
  pass "first password login over SSH $FIG_SSH_LOGIN s after QEMU started"
  # The harness itself: QEMU's restrict=on keeps the guest from the host (10.0.2.2 is the
  # host's 127.0.0.1 in user-mode networking; moto listens there).
  code=0
  vm_ssh "$name" "${TRAINEES[0]}" "${TRAINEES[1]}" \
    "timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/${MOTO_PORT:-5000}'" || code=$?
  case $code in
  1 | 124) pass "the guest cannot reach the host (restrict=on)" ;;
  0) die "[$name] the guest reaches the host's 127.0.0.1:${MOTO_PORT:-5000}: QEMU's restrict=on is not in force" ;;
  *) die "[$name] could not try the host from the guest (exit $code): $SSH_ERR" ;;
  esac
  for ((i = 0; i < ${#TRAINEES[@]}; i += 2)); do
    user=${TRAINEES[i]} password=${TRAINEES[i + 1]}
    vm_ssh "$name" "$user" "$password" 'id -un' && [ "$SSH_OUT" = "$user" ] ||
      die "[$name] trainee $user cannot log in with the emailed password: $SSH_ERR"
    pass "trainee $user logs in with the emailed password"
    expect_sudo_refused "$name" "$user" "$password" 'sudo -n true' ""
    expect_sudo_refused "$name" "$user" "$password" "sudo -S -p '' true" "$password"
    pass "trainee $user has no sudo (with or without the password)"
  done

  user=${ADMIN[0]} password=${ADMIN[1]}
  vm_ssh "$name" "$user" "$password" 'id -un' && [ "$SSH_OUT" = "$user" ] ||
    die "[$name] admin $user cannot log in with the emailed password: $SSH_ERR"
  pass "admin $user logs in with the emailed password"
  expect_sudo_refused "$name" "$user" "$password" 'sudo -n true' ""
  vm_ssh "$name" "$user" "$password" "sudo -S -p '' id -u" "$password" && [ "$SSH_OUT" = 0 ] ||
    die "[$name] admin $user cannot use sudo with its password: $SSH_ERR"
  pass "admin $user uses sudo with its password (and not without)"

  expect_refused "$name" "${TRAINEES[0]}" "not-${TRAINEES[1]}" "trainee ${TRAINEES[0]} with a wrong password"
  expect_refused "$name" "$user" "${TRAINEES[1]}" "admin $user with a trainee's password"
  read_logins "$slot1" # instance 1's trainees, on instance 0
  for ((i = 0; i < ${#TRAINEES[@]}; i += 2)); do
    expect_refused "$name" "${TRAINEES[i]}" "${TRAINEES[i + 1]}" "instance 1's trainee ${TRAINEES[i]}"
  done
  read_logins "$slot0"

  vm_ssh "$name" "$user" "$password" 'cloud-init status' || true
  [ "$(sed -n 's/^status: //p' <<<"$SSH_OUT")" = "done" ] ||
    die "[$name] cloud-init status: $SSH_OUT $SSH_ERR"
  pass "cloud-init status: done"
  vm_ssh "$name" "$user" "$password" "sudo -S -p '' getent shadow $(cut -d' ' -f1 "$slot0/hashes" | tr '\n' ' ')" \
    "$password" || die "[$name] cannot read /etc/shadow as the admin: $SSH_ERR"
  shadow=$SSH_OUT
  while read -r user hash; do
    [ "$(awk -F: -v u="$user" '$1 == u { print $2 }' <<<"$shadow")" = "$hash" ] ||
      die "[$name] /etc/shadow's hash for $user is not the user-data's"
  done <"$slot0/hashes"
  pass "/etc/shadow holds the user-data's hashes ($(wc -l <"$slot0/hashes") accounts)"
  vm_ssh "$name" "${ADMIN[0]}" "${ADMIN[1]}" "sudo -S -p '' grep -l '^PasswordAuthentication yes' -r /etc/ssh" \
    "${ADMIN[1]}" || true
  say "[$name] password logins turned on by: $(tr '\n' ' ' <<<"$SSH_OUT")"
  FIGURES[$name]="'labbook-bootstrap: ok' at $FIG_SSH_REPORT s, cloud-init done at $FIG_SSH_DONE s, first SSH login at $FIG_SSH_LOGIN s"
}

# The jupyterhub bootstrap on a machine that reaches nothing: instance 0 of the booking in DIR.
check_jupyterhub_boot() {
  local name=$1 slot0=$2/slot-0
  read_logins "$slot0"
  vm_wait "$name" "$REPORT_ERE" "$BOOT_TIMEOUT" "the bootstrap's report on the console"
  FIG_JH_FAILED=$(vm_seen_at "$name" "$REPORT_ERE")
  say "[$name] console at $FIG_JH_FAILED s: $VM_MATCH"
  case $VM_MATCH in
  "labbook-bootstrap: failed: download The Littlest JupyterHub's installer (exit "*)
    pass "the bootstrap reports that the installer could not be downloaded ($FIG_JH_FAILED s after QEMU started)"
    ;;
  *) die "[$name] expected the installer's download to fail, the console says: $VM_MATCH" ;;
  esac
  vm_wait "$name" "$CLOUD_INIT_DONE_ERE" $((FIG_JH_FAILED + 300)) "cloud-init's final message"
  FIG_JH_DONE=$(vm_seen_at "$name" "$CLOUD_INIT_DONE_ERE")
  pass "cloud-init finished ($FIG_JH_DONE s)"
  expect_refused "$name" "${TRAINEES[0]}" "${TRAINEES[1]}" "password SSH login (off in jupyterhub mode)"
  FIGURES[$name]="'labbook-bootstrap: failed' at $FIG_JH_FAILED s, cloud-init done at $FIG_JH_DONE s"
}

# The jupyterhub user-data on the stand-in for a baked image (image.sh), with the ACME server
# and certbot's wheels on the host (acme.sh): the fast path, and HTTPS.
check_baked_boot() {
  local name=$1 slot0=$2/slot-0 text allowed expected report i
  read_logins "$slot0"
  vm_wait "$name" "labbook-baked: [^[:cntrl:]]*" "$BOOT_TIMEOUT" "the bootstrap's fast-path line"
  pass "the bootstrap found the baked image's marker: $VM_MATCH"
  vm_wait "$name" "$REPORT_ERE" "$BOOT_TIMEOUT" "the bootstrap's report on the console"
  FIG_BAKED_REPORT=$(vm_seen_at "$name" "$REPORT_ERE")
  # The console as read now (grep -q in a pipe would fail it under pipefail).
  text=$(tr -d '\r' <"${VM_DIR[$name]}/console.log")
  report=$(grep -aoE 'labbook-bootstrap: [^[:cntrl:]]*' <<<"$text" | tail -n1) || true
  say "[$name] console at $FIG_BAKED_REPORT s: $report"
  [ "$report" = "labbook-bootstrap: ok" ] ||
    die "[$name] expected the fast path to succeed with HTTPS, the console says: $report"
  pass "the fast path reports ok, with HTTPS ($FIG_BAKED_REPORT s after QEMU started)"
  ! grep -aq "download The Littlest JupyterHub" <<<"$text" ||
    die "[$name] the fast path tried TLJH's installer"
  # The logins TLJH was given, as the stand-in's tljh-config wrote them on the console.
  allowed=$(grep -aoE 'boot-check tljh-config: add-item users\.allowed [^[:space:]]+' <<<"$text" |
    awk '{ print $NF }' | sort | tr '\n' ' ') || true
  expected=${ADMIN[0]}
  for ((i = 0; i < ${#TRAINEES[@]}; i += 2)); do expected+=$'\n'${TRAINEES[i]}; done
  expected=$(sort <<<"$expected" | tr '\n' ' ')
  [ "$allowed" = "$expected" ] ||
    die "[$name] TLJH was given the logins '$allowed', the booking's instance 0 has '$expected'"
  pass "TLJH was given exactly instance 0's logins and its admin: $allowed"
  grep -aq 'boot-check tljh-config: add-item users.admin '"${ADMIN[0]}" <<<"$text" ||
    die "[$name] the admin ${ADMIN[0]} was not made TLJH's admin"
  grep -aqE '^boot-check tljh-config: reload$' <<<"$text" ||
    die "[$name] TLJH was not reloaded"
  pass "the admin made TLJH's admin, and TLJH reloaded"
  check_baked_https "$name" "$text"
  vm_wait "$name" "$CLOUD_INIT_DONE_ERE" $((FIG_BAKED_REPORT + 300)) "cloud-init's final message"
  FIG_BAKED_DONE=$(vm_seen_at "$name" "$CLOUD_INIT_DONE_ERE")
  pass "cloud-init finished ($FIG_BAKED_DONE s)"
  FIGURES[$name]="'$report' at $FIG_BAKED_REPORT s (certificate at $FIG_CERT_AT s, its step $FIG_CERT_STEP s), cloud-init done at $FIG_BAKED_DONE s"
}

# check_baked_https NAME CONSOLE_TEXT: the address came from IMDSv2, the certificate from the
# ACME server for that address, installed where TLJH reads it; the machine serves it on 443,
# verified for the address up to the ACME server's root.
check_baked_https() {
  local name=$1 text=$2 line ip path serial issued root https_url i served
  grep -qE '^PUT /latest/api/token -> 200' "$IMDS_LOG" ||
    die "[$name] the bootstrap did not ask the instance metadata service for an IMDSv2 token"
  ip=$(grep -oE '^GET /latest/meta-data/public-ipv4 -> 200 [0-9.]+' "$IMDS_LOG" | awk '{ print $NF }' |
    tail -n1) || true
  [ "$ip" = "$ACME_PUBLIC_IPV4" ] ||
    die "[$name] the bootstrap did not read its public IPv4 address with a token (see $IMDS_LOG)"
  ! grep -qE ' -> 401 ' "$IMDS_LOG" ||
    die "[$name] the bootstrap asked the instance metadata service without a token (IMDSv1)"
  pass "the address from the instance metadata (IMDSv2, with a token): $ip"
  line=$(grep -aoE 'labbook-https: certificate for [0-9.]+ in [0-9]+ s: [^[:space:]]+' <<<"$text" |
    tail -n1) || true
  [ -n "$line" ] || die "[$name] no 'labbook-https: certificate for ...' line on the console"
  FIG_CERT_STEP=$(sed -E 's/.* in ([0-9]+) s: .*/\1/' <<<"$line")
  path=${line##*: }
  [[ $line == "labbook-https: certificate for $ip in "* ]] ||
    die "[$name] the certificate is for another address than the metadata's $ip: $line"
  [ "$path" = /etc/labbook/tls/fullchain.pem ] ||
    die "[$name] the certificate was installed at $path, not /etc/labbook/tls/fullchain.pem"
  FIG_CERT_AT=$(vm_seen_at "$name" 'labbook-https: certificate for')
  pass "the bootstrap's certificate step: $FIG_CERT_STEP s (certbot installed from its pinned wheels, the order), done at $FIG_CERT_AT s"
  issued=$(grep -aoE 'Issued certificate serial [0-9a-f]+' "$WORK/acme/pebble.log" |
    awk '{ print $NF }' | sed 's/^0*//' | tail -n1) || true
  [ -n "$issued" ] || die "[$name] the ACME server issued no certificate (see $WORK/acme/pebble.log)"
  for i in 'https.enabled true' 'https.tls.cert /etc/labbook/tls/fullchain.pem' \
    'https.tls.key /etc/labbook/tls/privkey.pem'; do
    grep -aqx "boot-check tljh-config: set $i" <<<"$text" ||
      die "[$name] TLJH was not told: tljh-config set $i"
  done
  awk '/^boot-check tljh-config: set https.tls.key/ { k = 1 } k && /^boot-check tljh-config: reload proxy$/ { r = 1 } END { exit !r }' <<<"$text" ||
    die "[$name] TLJH's proxy was not reloaded after its certificate was set"
  pass "TLJH was given the certificate and key in /etc/labbook/tls, HTTPS on, its proxy reloaded"

  # The machine's port 443, through QEMU's forward on 127.0.0.1: curl connects there but
  # checks the certificate for the machine's address, up to the ACME server's root.
  root=$WORK/acme/root.pem
  acme_root "$root"
  https_url="https://$ip/hub/health"
  for i in $(seq 1 30); do
    if curl -fsS --max-time 10 --cacert "$root" --connect-to "$ip:443:127.0.0.1:${VM_HTTPS_PORT[$name]}" \
      -o "$WORK/acme/health" "$https_url" 2>"$WORK/acme/curl.err"; then break; fi
    [ "$i" -lt 30 ] || die "[$name] $https_url over QEMU's forward: $(cat "$WORK/acme/curl.err")"
    sleep 2
  done
  pass "$https_url answers: $(tr -d '\n' <"$WORK/acme/health") (TLS verified for $ip up to the ACME server's root)"
  # No SNI: a browser sends none for an address.
  served=$(openssl s_client -connect "127.0.0.1:${VM_HTTPS_PORT[$name]}" -noservername \
    </dev/null 2>/dev/null | openssl x509 -noout -serial -ext subjectAltName -issuer -enddate 2>/dev/null) ||
    die "[$name] cannot read the certificate the machine serves"
  serial=$(sed -n 's/^serial=//p' <<<"$served" | tr 'A-F' 'a-f' | sed 's/^0*//')
  [ "$serial" = "$issued" ] ||
    die "[$name] the machine serves serial '$serial', the ACME server issued '$issued'"
  say "[$name] served: $(tr '\n' ' ' <<<"$served" | tr -s ' ')"
  pass "the certificate served is the one the ACME server issued for the order (serial $serial)"
}
