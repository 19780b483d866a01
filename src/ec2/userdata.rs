//! The instance bootstrap: cloud-init user-data that creates the slot's admin and users from
//! SHA-512-crypt hashes. Every process on an instance can read its user-data, so it never
//! holds a plaintext password.
//!
//! What cloud-init cannot do by itself runs as one bash script ([`BOOTSTRAP_PATH`]) with
//! `set -eu -o pipefail`: downloads retried with backoff, the JupyterHub install bounded in
//! time, and the outcome written as one line to the serial console, which EC2's
//! `GetConsoleOutput` returns without any network path to the machine:
//! `labbook-bootstrap: ok`, or `labbook-bootstrap: failed: <step> (exit <code>)`.
//!
//! With HTTPS on (JupyterHub mode, `LABBOOK_HTTPS=letsencrypt`), the script first gets a
//! certificate for the machine's public IPv4 address (read from IMDSv2) with a pinned certbot,
//! before anything listens on port 80 (certbot's standalone `http-01` challenge), then gives it
//! to The Littlest JupyterHub, whose proxy then serves 443 and redirects 80 there. The ACME
//! account key is made on the machine; the user-data holds only the directory URL and the
//! optional contact address. A machine that cannot get a certificate still serves its lab over
//! HTTP and says why in its report: `labbook-bootstrap: ok (http only: <why>)`.
//!
//! The same user-data boots a plain base image and a baked one (`labbook image build`, whose
//! bake script [`render_image`] renders). On a plain image the script installs the packages
//! (apt, with retries) and The Littlest JupyterHub; on a baked image ([`BAKED_MARKER`]) it
//! says so on the console (`labbook-baked: ...`, a line of its own, so the report keeps its
//! form) and skips both: it only sets the booking's logins, the certificate, and reloads.

use serde::Serialize;

use crate::config::{AcmeSettings, Bootstrap, Https};

/// EC2 refuses user-data above 16 KiB.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// One login to create: a name and its SHA-512-crypt hash.
#[derive(Debug, Clone)]
pub struct Account<'a> {
    pub username: &'a str,
    pub password_hash: &'a str,
}

#[derive(Serialize)]
struct CloudConfig<'a> {
    users: Vec<User<'a>>,
    ssh_pwauth: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    package_update: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    package_upgrade: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    packages: Vec<&'static str>,
    write_files: Vec<WriteFile>,
    runcmd: Vec<Vec<String>>,
}

#[derive(Serialize)]
struct WriteFile {
    path: &'static str,
    permissions: &'static str,
    owner: &'static str,
    content: String,
}

/// Where the bootstrap script is written on the instance.
pub const BOOTSTRAP_PATH: &str = "/usr/local/sbin/labbook-bootstrap";

/// The marker lines the bootstrap writes to the serial console.
pub const REPORT_OK: &str = "labbook-bootstrap: ok";
pub const REPORT_FAILED: &str = "labbook-bootstrap: failed: ";
/// What follows [`REPORT_OK`] on a machine that serves its lab over HTTP because it could not
/// get a certificate: `labbook-bootstrap: ok (http only: <why>)`.
pub const REPORT_HTTP_ONLY: &str = " (http only: ";

/// The certbot release the HTTPS bootstrap installs (IP identifiers and ACME profiles came in
/// certbot 5.3); every wheel is pinned by its hash in `certbot-requirements.txt`.
pub const CERTBOT_VERSION: &str = "5.8.0";
const CERTBOT_REQUIREMENTS: &str = include_str!("certbot-requirements.txt");

/// Where the bootstrap leaves the machine's certificate and key for TLJH's proxy.
pub const TLS_CERT_PATH: &str = "/etc/labbook/tls/fullchain.pem";
pub const TLS_KEY_PATH: &str = "/etc/labbook/tls/privkey.pem";

/// How the bootstrap script begins: what it is, where its log goes.
const SCRIPT_INTRO: &str = r#"#!/bin/bash
# labbook's instance bootstrap: run by cloud-init once the accounts exist. Its outcome is one
# line on the serial console: "labbook-bootstrap: ok" or "labbook-bootstrap: failed: <step>".
reporter=labbook-bootstrap
log=${LABBOOK_BOOTSTRAP_LOG:-/var/log/labbook-bootstrap.log}
"#;

/// What the bootstrap and the image bake share: strict mode, the report on the serial console
/// (`$reporter: ok`), the trap that reports the failing step. `LABBOOK_CONSOLE` exists for
/// tests of the scripts; on an instance it is the serial console (the log likewise).
const SCRIPT_STRICT: &str = r#"set -eu -o pipefail -o errtrace
console=${LABBOOK_CONSOLE:-/dev/console}
report() { printf '\n%s: %s\n' "$reporter" "$1" | tee -a "$log" >>"$console" 2>/dev/null || true; }
step="start"
trap 'code=$?; report "failed: $step (exit $code)"; exit $code' ERR
https=off http_only="" tls_ready=""
"#;

/// The bootstrap's arguments: its mode, the slot's admin, then the slot's trainees.
const SCRIPT_ARGS: &str = r#"mode=$1 admin=$2
shift 2
"#;

/// The HTTPS part's functions (rendered after the settings they read: `acme_directory`,
/// `acme_email`, `certbot_version`). Nothing here fails the bootstrap: a step that cannot be
/// done sets `http_only` to why, and the lab is served over HTTP. `LABBOOK_IMDS_URL`,
/// `LABBOOK_ACME_HOME`, `LABBOOK_ACME_STATE`, `LABBOOK_TLS_DIR` and `LABBOOK_CA_BUNDLE` exist
/// for tests of the script.
const SCRIPT_HTTPS: &str = r#"imds=${LABBOOK_IMDS_URL:-http://169.254.169.254}
acme_home=${LABBOOK_ACME_HOME:-/opt/labbook/certbot}
acme_state=${LABBOOK_ACME_STATE:-/etc/labbook/acme}
tls_dir=${LABBOOK_TLS_DIR:-/etc/labbook/tls}
# certbot trusts the machine's own CA store (as curl does), not the copy pip installs.
ca_bundle=${LABBOOK_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
note() { printf '%s %s\n' "$(date -u +%FT%TZ)" "$1" >>"$log"; }
# IMDSv2: a session token, then the address EC2 maps to this machine.
public_ipv4() {
  local token ip
  token=$(curl -fsS --connect-timeout 5 --max-time 10 -X PUT \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$imds/latest/api/token") || return 1
  ip=$(curl -fsS --connect-timeout 5 --max-time 10 -H "X-aws-ec2-metadata-token: $token" \
    "$imds/latest/meta-data/public-ipv4") || return 1
  [[ $ip =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
  printf '%s\n' "$ip"
}
# certbot in a virtual environment of its own, every wheel checked against its pinned hash;
# kept when a baked image has this version already.
install_certbot() {
  if [ "$(cat "$acme_home/labbook-version" 2>/dev/null)" = "$certbot_version" ]; then return 0; fi
  rm -rf "$acme_home"
  python3 -m venv "$acme_home" >>"$log" 2>&1 || return 1
  printf '%s\n' "$certbot_requirements" >"$acme_home/requirements.txt"
  "$acme_home/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes \
    --only-binary :all: --timeout 30 --retries 5 -r "$acme_home/requirements.txt" >>"$log" 2>&1 ||
    return 1
  printf '%s\n' "$certbot_version" >"$acme_home/labbook-version"
}
# The certificate certbot saved, if it names this address and outlives any booking (24 h).
certificate_fits() {
  local cert=$acme_state/live/labbook/cert.pem
  openssl x509 -in "$cert" -noout -checkend 86400 >/dev/null 2>&1 &&
    openssl x509 -in "$cert" -noout -ext subjectAltName 2>/dev/null | tr ',' '\n' |
    sed 's/^[[:space:]]*//' | grep -Fqx "IP Address:$1"
}
# One order for the address, under the shortlived profile where the server has it (Let's
# Encrypt issues IP certificates under it only). certbot's exit code is not the verdict: some
# servers put the address in the subject too, which certbot trips on after saving the
# certificate; the certificate itself is checked instead. Sets why when there is none, from
# certbot's output and its log (certbot prints a problem's detail, not always its type): a
# limit; a validation that failed (no retry: the order was made, and a new one fails alike);
# a server that cannot be reached (retried).
request_certificate() {
  local ip=$1 out=$acme_state/certbot.out contact=(--register-unsafely-without-email)
  if [ -n "$acme_email" ]; then contact=(--email "$acme_email"); fi
  mkdir -p "$acme_state"
  REQUESTS_CA_BUNDLE=$ca_bundle "$acme_home/bin/certbot" certonly --standalone --non-interactive \
    --agree-tos "${contact[@]}" --server "$acme_directory" --ip-address "$ip" \
    --preferred-profile shortlived --cert-name labbook --config-dir "$acme_state" \
    --work-dir "$acme_state/work" --logs-dir "$acme_state/logs" >"$out" 2>&1 || true
  cat "$out" >>"$log"
  certificate_fits "$ip" && return 0
  if grep -qiE 'rateLimited|too many (certificates|requests|new orders|failed auth|registrations)' \
    "$out" "$acme_state/logs/letsencrypt.log" 2>/dev/null; then
    why="rate limited by the ACME server"
  elif grep -qi 'failed to authenticate' "$out"; then
    why="the ACME server could not reach this machine on port 80"
  elif grep -qiE 'connection|timed? ?out|resolve|unreachable' "$out"; then
    why="the ACME server could not be reached"
  else
    why="the ACME server issued no certificate"
  fi
  return 1
}
# A certificate for this machine's address, tried three times while the server cannot be
# reached; on success tls_ready is set, else http_only says why.
obtain_certificate() {
  local ip try t0=$SECONDS why="" pause=${LABBOOK_RETRY_SECONDS:-10}
  step="read the public IPv4 address (IMDSv2)"
  if ! ip=$(public_ipv4); then http_only="no public IPv4 address in the instance metadata"; return 0; fi
  step="install the ACME client (certbot $certbot_version)"
  if ! install_certbot; then http_only="the ACME client could not be installed"; return 0; fi
  step="get a certificate for $ip"
  for try in 1 2 3; do
    if request_certificate "$ip"; then break; fi
    if [ "$why" != "the ACME server could not be reached" ] || [ "$try" -eq 3 ]; then
      http_only=$why
      note "labbook-https: no certificate for $ip: $why"
      return 0
    fi
    sleep $((pause * try))
  done
  install -d -m 0755 "$tls_dir"
  install -m 0644 "$acme_state/live/labbook/fullchain.pem" "$tls_dir/fullchain.pem"
  install -m 0600 "$acme_state/live/labbook/privkey.pem" "$tls_dir/privkey.pem"
  tls_ready=1
  printf 'labbook-https: certificate for %s in %s s: %s\n' "$ip" $((SECONDS - t0)) \
    "$tls_dir/fullchain.pem" | tee -a "$log" >>"$console" 2>/dev/null || true
}
# TLJH's proxy serves the certificate on 443 and redirects 80 there; a proxy that does not take
# it is put back on plain HTTP.
serve_https() {
  step="serve JupyterHub over HTTPS"
  if tljh-config set https.enabled true && tljh-config set https.tls.cert "$tls_dir/fullchain.pem" &&
    tljh-config set https.tls.key "$tls_dir/privkey.pem" && tljh-config reload proxy; then
    return 0
  fi
  http_only="JupyterHub's proxy did not take the certificate"
  tljh-config set https.enabled false
  tljh-config reload proxy
}
"#;

/// The Littlest JupyterHub's install, as the bootstrap and the image bake both run it: its
/// installer downloaded with retries and backoff, then run within 25 minutes, with `--admin`
/// when `$admin` names one (the bake makes no account). `LABBOOK_TLJH_URL`,
/// `LABBOOK_TLJH_INSTALLER` and `LABBOOK_RETRY_SECONDS` exist for tests of the scripts.
const SCRIPT_TLJH_INSTALL: &str = r#"  step="download The Littlest JupyterHub's installer"
  url=${LABBOOK_TLJH_URL:-https://tljh.jupyter.org/bootstrap.py}
  installer=${LABBOOK_TLJH_INSTALLER:-/root/tljh-bootstrap.py}
  pause=${LABBOOK_RETRY_SECONDS:-10}
  for try in 1 2 3 4 5 6; do
    got=0
    curl -fsSL --connect-timeout 20 --max-time 300 -o "$installer" "$url" || got=$?
    if [ "$got" -eq 0 ]; then break; fi
    # The last try fails the step with curl's own exit code.
    if [ "$try" -eq 6 ]; then (exit "$got"); fi
    sleep $((pause * try))
  done
  step="install The Littlest JupyterHub"
  timeout 1500 python3 "$installer" ${admin:+--admin "$admin"} --user-requirements-txt-url ''
"#;

/// The slow path's packages (`packages`, an array), installed by the script rather than by
/// cloud-init's `packages:` so that a machine from a baked image, which holds them, asks apt for
/// nothing. Three tries with backoff, apt's lock waited for (unattended upgrades may hold it at
/// a first boot); before a retry, `dpkg --configure -a` finishes what a killed try (its own
/// timeout, or an interrupted unattended upgrade) left half-configured, without which apt
/// refuses every later install ("dpkg was interrupted"). A failure is logged and the bootstrap
/// goes on, as cloud-init's did: what is missing fails its own step.
const SCRIPT_PACKAGES: &str = r#"install_packages() {
  local try pause=${LABBOOK_RETRY_SECONDS:-10} lock=DPkg::Lock::Timeout=300
  # As cloud-init's installs: a changed configuration file is kept, never asked about.
  local keep="-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
  step="install the packages (${packages[*]})"
  for try in 1 2 3; do
    if timeout 600 apt-get -q -o "$lock" update >>"$log" 2>&1 &&
      DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -q -y -o "$lock" $keep install \
        "${packages[@]}" >>"$log" 2>&1; then
      return 0
    fi
    if [ "$try" -lt 3 ]; then
      sleep $((pause * try))
      DEBIAN_FRONTEND=noninteractive timeout 600 dpkg --force-confdef --force-confold \
        --configure -a >>"$log" 2>&1 || true
    fi
  done
  printf '%s could not install %s\n' "$(date -u +%FT%TZ)" "${packages[*]}" >>"$log"
}
"#;

/// The JupyterHub part. On a machine from a baked image (its [`BAKED_MARKER`];
/// `LABBOOK_BAKED_MARKER` exists for tests of the script) the fast path: no package, no
/// installer; the image's hub and proxy are stopped until the booking's logins are set (the
/// ACME challenge needs port 80 too), then started and enabled. Elsewhere the packages, then
/// TLJH's install ([`SCRIPT_TLJH_INSTALL`]). Both then allow exactly the slot's logins and
/// serve HTTPS if a certificate was had.
const SCRIPT_JUPYTERHUB_START: &str = r#"if [ "$mode" = jupyterhub ]; then
  baked=${LABBOOK_BAKED_MARKER:-/etc/labbook/baked} fast=""
  if [ -f "$baked" ]; then
    fast=1
    printf 'labbook-baked: %s- the install is skipped\n' "$(tr '\n' ' ' <"$baked")" |
      tee -a "$log" >>"$console" 2>/dev/null || true
    step="stop the image's JupyterHub until it is set up"
    systemctl stop jupyterhub traefik
  else
    install_packages
  fi
  # Before TLJH's proxy listens on port 80, which the ACME challenge needs.
  if [ "$https" = on ]; then obtain_certificate; fi
  if [ -z "$fast" ]; then
"#;

/// Between the install and the logins: on the fast path, TLJH's proxy is started first (the
/// hub's reload waits until it answers through it).
const SCRIPT_JUPYTERHUB_PROXY: &str = r#"  else
    step="start The Littlest JupyterHub's proxy"
    tljh-config reload proxy
  fi
"#;

const SCRIPT_JUPYTERHUB_END: &str = r#"  step="allow the booking's logins"
  tljh-config set auth.type jupyterhub.auth.PAMAuthenticator
  for name in "$admin" "$@"; do tljh-config add-item users.allowed "$name"; done
  tljh-config add-item users.admin "$admin"
  tljh-config reload
  if [ -n "$tls_ready" ]; then serve_https; fi
  if [ -n "$fast" ]; then
    step="start JupyterHub at every boot"
    systemctl enable jupyterhub traefik
  fi
fi
"#;

/// SSH mode on a machine from a baked image: the image's JupyterHub (enabled in images baked
/// before the bake disabled it) must not serve a login page nobody set up.
const SCRIPT_SSH: &str = r#"if [ "$mode" = ssh ] && [ -f "${LABBOOK_BAKED_MARKER:-/etc/labbook/baked}" ]; then
  step="keep the image's JupyterHub off"
  systemctl disable --now jupyterhub traefik >>"$log" 2>&1 || true
fi
"#;

const SCRIPT_TAIL: &str = r#"step="finish"
if [ -n "$http_only" ]; then report "ok (http only: $http_only)"; else report ok; fi
"#;

/// What JupyterHub mode installs before TLJH (its installer's needs).
const JUPYTERHUB_PACKAGES: &[&str] = &["curl", "python3", "python3-dev", "git"];
/// What HTTPS adds: certbot's virtual environment, and the check of its certificate.
const HTTPS_PACKAGES: &[&str] = &["python3-venv", "openssl"];

/// Where the image bake script is written on the image builder.
pub const IMAGE_BAKE_PATH: &str = "/usr/local/sbin/labbook-image";

/// The marker lines the image bake writes to the serial console.
pub const IMAGE_REPORT_OK: &str = "labbook-image: ok";
pub const IMAGE_REPORT_FAILED: &str = "labbook-image: failed: ";

/// The file a baked image holds: `labbook_version=`, `holds=`, `baked_at=` lines.
pub const BAKED_MARKER: &str = "/etc/labbook/baked";

/// What a baked image holds, as its `labbook:holds` tag says: The Littlest JupyterHub and the
/// pinned certbot.
pub fn image_holds() -> String {
    format!("tljh,certbot {CERTBOT_VERSION}")
}

/// How the image bake begins.
const IMAGE_INTRO: &str = r#"#!/bin/bash
# labbook's image bake, run by cloud-init on the image builder: installs what every lab machine
# needs, then clears what must not be shared between machines. Its outcome is one line on the
# serial console: "labbook-image: ok" or "labbook-image: failed: <step> (exit N)".
reporter=labbook-image
log=${LABBOOK_IMAGE_LOG:-/var/log/labbook-image.log}
"#;

/// The bake's software: the pinned certbot, then TLJH ([`SCRIPT_TLJH_INSTALL`], no admin).
const IMAGE_BAKE_START: &str = r#"admin=""
step="install the ACME client (certbot $certbot_version)"
install_certbot
"#;

/// JupyterHub's services off (a machine from the image serves no login before its bootstrap has
/// set the booking's; the bootstrap enables them), the marker, then the seal: a machine made
/// from the image must be a new machine to cloud-init (its state, logs and machine id cleared),
/// with SSH host keys of its own (cloud-init makes them at its first boot). The rest of this boot's cloud-init run writes a
/// little state again after the clean; a machine from the image has another instance id, so
/// cloud-init runs its first-boot modules all the same. `LABBOOK_IMAGE_ROOT` and
/// `LABBOOK_BAKED_MARKER` exist for tests of the script.
const IMAGE_BAKE_END: &str = r#"root=${LABBOOK_IMAGE_ROOT:-}
step="keep JupyterHub off until a machine's bootstrap sets it up"
systemctl disable jupyterhub traefik >>"$log" 2>&1
baked=${LABBOOK_BAKED_MARKER:-$root/etc/labbook/baked}
step="write the marker $baked"
mkdir -p "$(dirname "$baked")"
printf 'labbook_version=%s\nholds=tljh,certbot %s\nbaked_at=%s\n' "$labbook_version" \
  "$certbot_version" "$(date -u +%FT%TZ)" >"$baked"
step="clean what must not be shared"
rm -f "$installer"
cloud-init clean --logs --machine-id >>"$log" 2>&1 || cloud-init clean --logs
: >"$root/etc/machine-id"
rm -f "$root"/etc/ssh/ssh_host_*
rm -f "$root"/root/.bash_history "$root"/home/*/.bash_history
# Each machine's hub makes its own cookie secret at its first start.
rm -f "$root"/opt/tljh/state/jupyterhub_cookie_secret
journalctl --rotate >/dev/null 2>&1 || true
journalctl --vacuum-time=1s >/dev/null 2>&1 || true
find "$root/var/log" -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
find "$root/var/log" -type f -exec truncate -s 0 {} +
rm -f "$0"
log=/dev/null
step="finish"
report ok
"#;

/// Renders the `#cloud-config` user-data of the image builder: no account of any booking
/// (only the image's default user), the system upgraded, then the bake script as `runcmd`.
pub fn render_image() -> Result<String, String> {
    let script = [
        IMAGE_INTRO,
        SCRIPT_STRICT,
        certbot_settings().as_str(),
        format!(
            "labbook_version={}\n",
            shell_quote(env!("CARGO_PKG_VERSION"))
        )
        .as_str(),
        SCRIPT_HTTPS,
        IMAGE_BAKE_START,
        SCRIPT_TLJH_INSTALL,
        IMAGE_BAKE_END,
    ]
    .concat();
    let config = CloudConfig {
        users: vec![User::Default("default")],
        ssh_pwauth: false,
        package_update: Some(true),
        // Security updates are one reason to bake again: the image holds them.
        package_upgrade: Some(true),
        packages: [JUPYTERHUB_PACKAGES, HTTPS_PACKAGES].concat(),
        write_files: vec![WriteFile {
            path: IMAGE_BAKE_PATH,
            permissions: "0755",
            owner: "root:root",
            content: script,
        }],
        runcmd: vec![vec![IMAGE_BAKE_PATH.to_owned()]],
    };
    let yaml =
        serde_yaml_ng::to_string(&config).map_err(|e| format!("rendering user-data: {e}"))?;
    let out = format!("#cloud-config\n{yaml}");
    if out.len() > MAX_USER_DATA_BYTES {
        return Err(format!(
            "the image builder's user-data is {} bytes, above EC2's {MAX_USER_DATA_BYTES}",
            out.len()
        ));
    }
    Ok(out)
}

/// What the image builder's console says of its bake: `Some(Ok(()))` on its report of
/// success, `Some(Err(step))` on its report of failure (`<step> (exit N)`), `None` before it
/// reports. The last report counts, wherever it is in its line.
pub fn image_outcome(console: &str) -> Option<Result<(), String>> {
    console.lines().rev().find_map(|line| {
        if line.contains(IMAGE_REPORT_OK) {
            Some(Ok(()))
        } else {
            line.find(IMAGE_REPORT_FAILED)
                .map(|at| Err(line[at + IMAGE_REPORT_FAILED.len()..].trim().to_owned()))
        }
    })
}

#[derive(Serialize)]
#[serde(untagged)]
enum User<'a> {
    Default(&'static str),
    Account {
        name: &'a str,
        gecos: &'static str,
        shell: &'static str,
        lock_passwd: bool,
        passwd: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        groups: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sudo: Option<&'static str>,
    },
}

/// Renders the `#cloud-config` user-data for one slot. `https` matters in JupyterHub mode only.
pub fn render(
    bootstrap: Bootstrap,
    https: &Https,
    admin: &Account<'_>,
    users: &[Account<'_>],
) -> Result<String, String> {
    let mut accounts = vec![User::Default("default"), account(admin, true)];
    accounts.extend(users.iter().map(|u| account(u, false)));

    let mode = match bootstrap {
        Bootstrap::JupyterHub => "jupyterhub",
        Bootstrap::Ssh => "ssh",
    };
    let acme = https.acme().filter(|_| bootstrap == Bootstrap::JupyterHub);
    let mut script = [SCRIPT_INTRO, SCRIPT_STRICT, SCRIPT_ARGS].concat();
    if let Some(acme) = acme {
        script.push_str(&https_settings(acme));
        script.push_str(SCRIPT_HTTPS);
    }
    if bootstrap == Bootstrap::JupyterHub {
        let packages = if acme.is_some() {
            [JUPYTERHUB_PACKAGES, HTTPS_PACKAGES].concat()
        } else {
            JUPYTERHUB_PACKAGES.to_vec()
        };
        script.push_str(&format!("packages=({})\n", packages.join(" ")));
        script.push_str(SCRIPT_PACKAGES);
        script.push_str(SCRIPT_JUPYTERHUB_START);
        script.push_str(SCRIPT_TLJH_INSTALL);
        script.push_str(SCRIPT_JUPYTERHUB_PROXY);
        script.push_str(SCRIPT_JUPYTERHUB_END);
    }
    if bootstrap == Bootstrap::Ssh {
        script.push_str(SCRIPT_SSH);
    }
    script.push_str(SCRIPT_TAIL);
    let mut run = vec![
        BOOTSTRAP_PATH.to_owned(),
        mode.into(),
        admin.username.into(),
    ];
    run.extend(users.iter().map(|u| u.username.to_owned()));
    let write_files = vec![WriteFile {
        path: BOOTSTRAP_PATH,
        permissions: "0755",
        owner: "root:root",
        content: script,
    }];
    let config = match bootstrap {
        Bootstrap::Ssh => CloudConfig {
            users: accounts,
            ssh_pwauth: true,
            package_update: None,
            package_upgrade: None,
            packages: Vec::new(),
            write_files,
            runcmd: vec![run],
        },
        // The packages are the script's (SCRIPT_PACKAGES): cloud-init's would reach apt's
        // mirrors on a baked image too.
        Bootstrap::JupyterHub => CloudConfig {
            users: accounts,
            ssh_pwauth: false,
            package_update: None,
            package_upgrade: None,
            packages: Vec::new(),
            write_files,
            runcmd: vec![run],
        },
    };
    let yaml =
        serde_yaml_ng::to_string(&config).map_err(|e| format!("rendering user-data: {e}"))?;
    let out = format!("#cloud-config\n{yaml}");
    if out.len() > MAX_USER_DATA_BYTES {
        return Err(format!(
            "user-data for {} users is {} bytes, above EC2's {MAX_USER_DATA_BYTES}: lower LABBOOK_USERS_PER_INSTANCE",
            users.len(),
            out.len()
        ));
    }
    Ok(out)
}

/// The HTTPS settings as shell assignments, each value single-quoted.
/// How many trainees one machine's user-data holds within EC2's 16 KiB, with the longest names
/// and hashes labbook makes: `Err` says how many fit when `users` do not, so a setting that
/// could only fail at launch is refused when the process starts.
pub fn check_room(
    bootstrap: Bootstrap,
    https: &Https,
    admin: &str,
    users: u32,
) -> Result<(), String> {
    // A generated login (`u` and 13 characters), a SHA-512-crypt hash (16 characters of salt).
    let hash = format!("$6${}${}", "s".repeat(16), "h".repeat(86));
    let names: Vec<String> = (0..users).map(|i| format!("u{i:013}")).collect();
    let fits = |n: usize| {
        let accounts: Vec<Account<'_>> = names[..n]
            .iter()
            .map(|name| Account {
                username: name,
                password_hash: &hash,
            })
            .collect();
        let admin = Account {
            username: admin,
            password_hash: &hash,
        };
        render(bootstrap, https, &admin, &accounts).is_ok()
    };
    if fits(names.len()) {
        return Ok(());
    }
    // The most that fit: a binary search (fits(0) holds unless the script alone is too big).
    let (mut lo, mut hi) = (0, names.len());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) { lo = mid } else { hi = mid }
    }
    Err(format!(
        "{users} trainees per machine make its user-data larger than EC2's 16 KiB: at most {lo} fit with these settings"
    ))
}

fn https_settings(acme: &AcmeSettings) -> String {
    let email = acme.email.as_ref().map_or("", |e| e.as_str());
    format!(
        "https=on\nacme_directory={}\nacme_email={}\n{}",
        shell_quote(&acme.directory),
        shell_quote(email),
        certbot_settings(),
    )
}

/// The pinned certbot's version and its hashed requirements, as shell assignments.
fn certbot_settings() -> String {
    let requirements: Vec<&str> = CERTBOT_REQUIREMENTS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    format!(
        "certbot_version={}\ncertbot_requirements={}\n",
        shell_quote(CERTBOT_VERSION),
        shell_quote(&requirements.join("\n")),
    )
}

/// `value` as one single-quoted shell word.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn account<'a>(a: &Account<'a>, is_admin: bool) -> User<'a> {
    User::Account {
        name: a.username,
        gecos: if is_admin {
            "labbook admin"
        } else {
            "labbook trainee"
        },
        shell: "/bin/bash",
        lock_passwd: false,
        passwd: a.password_hash,
        groups: is_admin.then_some("sudo"),
        // The admin is asked for its password by sudo (no NOPASSWD).
        sudo: is_admin.then_some("ALL=(ALL) ALL"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$6$saltsalt$abcdefghijklmnopqrstuvwxyz";

    #[test]
    fn jupyterhub_allows_exactly_the_slot_users() {
        let admin = Account {
            username: "labadmin",
            password_hash: HASH,
        };
        let users = [
            Account {
                username: "ualice",
                password_hash: HASH,
            },
            Account {
                username: "ubob",
                password_hash: HASH,
            },
        ];
        let out = render(Bootstrap::JupyterHub, &Https::Off, &admin, &users).unwrap();
        assert!(out.starts_with("#cloud-config\n"));
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
        let names: Vec<&str> = v["users"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|u| u["name"].as_str())
            .collect();
        assert_eq!(names, ["labadmin", "ualice", "ubob"]);
        assert_eq!(v["users"][1]["passwd"].as_str(), Some(HASH));
        assert_eq!(v["users"][1]["lock_passwd"].as_bool(), Some(false));
        // The bootstrap allows exactly the admin and the slot's trainees.
        let run: Vec<&str> = v["runcmd"][0]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            run,
            [BOOTSTRAP_PATH, "jupyterhub", "labadmin", "ualice", "ubob"]
        );
        let script = v["write_files"][0]["content"].as_str().unwrap();
        assert!(script.contains("set -eu -o pipefail"));
        assert!(script.contains("users.allowed"));
    }

    #[test]
    fn ssh_enables_password_login_without_jupyterhub() {
        let admin = Account {
            username: "labadmin",
            password_hash: HASH,
        };
        let out = render(Bootstrap::Ssh, &lets_encrypt(), &admin, &[]).unwrap();
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
        assert_eq!(v["ssh_pwauth"].as_bool(), Some(true));
        assert!(!out.contains("tljh"));
        // SSH is encrypted already: no certificate is asked for in SSH mode.
        assert!(!out.contains("certbot"));
    }

    fn lets_encrypt() -> Https {
        Https::Acme(AcmeSettings {
            directory: crate::config::LETS_ENCRYPT_DIRECTORY.into(),
            email: None,
        })
    }

    fn script_of(out: &str) -> String {
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(out).unwrap();
        v["write_files"][0]["content"].as_str().unwrap().to_owned()
    }

    #[test]
    fn https_gives_tljh_the_certificate_for_the_public_address() {
        let admin = Account {
            username: "labadmin",
            password_hash: HASH,
        };
        let https = Https::Acme(AcmeSettings {
            directory: "https://acme.example/dir?it's=1".into(),
            email: Some(crate::domain::EmailAddress::parse("ops@example.org").unwrap()),
        });
        let out = render(Bootstrap::JupyterHub, &https, &admin, &[]).unwrap();
        let script = script_of(&out);
        let lines: Vec<&str> = script.lines().map(str::trim).collect();
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle:?} in the script"))
        };
        // The settings, quoted for the shell; no secret among them.
        assert!(lines.contains(&r"acme_directory='https://acme.example/dir?it'\''s=1'"));
        assert!(lines.contains(&"acme_email='ops@example.org'"));
        assert!(lines.contains(&"certbot_version='5.8.0'"));
        // The address from IMDSv2, then certbot's order for it, before TLJH is installed (its
        // proxy would hold port 80).
        assert!(script.contains("X-aws-ec2-metadata-token-ttl-seconds"));
        assert!(script.contains("latest/meta-data/public-ipv4"));
        assert!(script.contains("--ip-address \"$ip\""));
        assert!(script.contains("--preferred-profile shortlived"));
        assert!(script.contains("--server \"$acme_directory\""));
        assert!(script.contains("--require-hashes"));
        assert!(at("then obtain_certificate; fi") < at("python3 \"$installer\""));
        // TLJH's settings: HTTPS on, the certificate and key where the bootstrap put them,
        // the proxy reloaded; after the logins are set up.
        assert!(script.contains("tljh-config set https.enabled true"));
        assert!(script.contains("tljh-config set https.tls.cert \"$tls_dir/fullchain.pem\""));
        assert!(script.contains("tljh-config set https.tls.key \"$tls_dir/privkey.pem\""));
        assert!(script.contains("tljh-config reload proxy"));
        assert!(script.contains("tls_dir=${LABBOOK_TLS_DIR:-/etc/labbook/tls}"));
        assert_eq!(
            (TLS_CERT_PATH, TLS_KEY_PATH),
            (
                "/etc/labbook/tls/fullchain.pem",
                "/etc/labbook/tls/privkey.pem"
            )
        );
        assert!(at("users.admin") < at("then serve_https; fi"));
        assert!(script.contains(r#"report "ok (http only: $http_only)""#));
        // Every pinned wheel has its hash; the file's comments stay out of the user-data.
        for line in CERTBOT_REQUIREMENTS.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                line.contains("==") && line.contains("--hash=sha256:"),
                "{line}"
            );
        }
        assert!(!script.contains("To update:"));
        // The packages are the script's, not cloud-init's (none on a baked image).
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
        assert!(v["packages"].is_null() && v["package_update"].is_null());
        assert!(
            lines.contains(&"packages=(curl python3 python3-dev git python3-venv openssl)"),
            "{script}"
        );
    }

    #[test]
    fn https_off_asks_for_no_certificate() {
        let admin = Account {
            username: "labadmin",
            password_hash: HASH,
        };
        let out = render(Bootstrap::JupyterHub, &Https::Off, &admin, &[]).unwrap();
        let script = script_of(&out);
        assert!(!script.contains("certbot"));
        assert!(!script.contains("https.enabled"));
        assert!(script.contains("tljh-config reload"));
    }

    #[test]
    fn the_image_bake_installs_what_the_bootstrap_does_and_no_account() {
        let out = render_image().unwrap();
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
        assert_eq!(
            v["users"].as_sequence().unwrap().len(),
            1,
            "only the default user"
        );
        assert_eq!(v["package_upgrade"].as_bool(), Some(true));
        assert_eq!(v["runcmd"][0][0].as_str(), Some(IMAGE_BAKE_PATH));
        let script = script_of(&out);
        assert!(script.contains("set -eu -o pipefail"));
        assert!(script.contains(SCRIPT_TLJH_INSTALL));
        assert!(script.contains("install_certbot\n"));
        assert!(script.contains("certbot_version='5.8.0'"));
        assert!(script.contains(&format!("labbook_version='{}'", env!("CARGO_PKG_VERSION"))));
        assert!(script.contains("cloud-init clean --logs --machine-id"));
        assert!(
            !script.contains("tljh-config add-item"),
            "no login is allowed"
        );
        assert!(!script.contains("labbook-bootstrap"));
        // The bootstrap runs the same install, with its admin.
        let admin = Account {
            username: "labadmin",
            password_hash: HASH,
        };
        let bootstrap =
            script_of(&render(Bootstrap::JupyterHub, &Https::Off, &admin, &[]).unwrap());
        assert!(bootstrap.contains(SCRIPT_TLJH_INSTALL));
        assert_eq!(image_holds(), "tljh,certbot 5.8.0");
    }

    #[test]
    fn the_last_image_report_counts() {
        assert_eq!(image_outcome(""), None);
        assert_eq!(image_outcome("[ 3.1] cloud-init running\n"), None);
        let ok = format!("noise\n[ 600.1] cloud-init[900]: {IMAGE_REPORT_OK}\n");
        assert_eq!(image_outcome(&ok), Some(Ok(())));
        let failed = format!("{IMAGE_REPORT_FAILED}install The Littlest JupyterHub (exit 1)\n");
        assert_eq!(
            image_outcome(&failed),
            Some(Err("install The Littlest JupyterHub (exit 1)".into()))
        );
        // A lab machine's report is not the image's.
        assert_eq!(image_outcome(&format!("{REPORT_OK}\n")), None);
    }

    #[test]
    fn too_many_trainees_per_machine_are_refused_at_start() {
        let https = lets_encrypt();
        assert!(check_room(Bootstrap::JupyterHub, &https, "labadmin", 2).is_ok());
        let err = check_room(Bootstrap::JupyterHub, &https, "labadmin", 200).unwrap_err();
        let most: u32 = err
            .rsplit("at most ")
            .next()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((2..200).contains(&most), "{err}");
        assert!(check_room(Bootstrap::JupyterHub, &https, "labadmin", most).is_ok());
        assert!(check_room(Bootstrap::JupyterHub, &https, "labadmin", most + 1).is_err());
    }

    #[test]
    fn oversized_user_data_is_refused() {
        let admin = Account {
            username: "labadmin",
            password_hash: HASH,
        };
        let names: Vec<String> = (0..200).map(|i| format!("user{i:04}")).collect();
        let hash = format!("$6${}", "x".repeat(100));
        let users: Vec<Account<'_>> = names
            .iter()
            .map(|n| Account {
                username: n,
                password_hash: &hash,
            })
            .collect();
        assert!(
            render(Bootstrap::Ssh, &Https::Off, &admin, &users)
                .unwrap_err()
                .contains("LABBOOK_USERS_PER_INSTANCE")
        );
    }
}

/// The bootstrap script as cloud-init runs it, by real `bash`, every outside tool it calls
/// stubbed on `PATH`: each stub appends `<name> <arguments>` to one log, so that the order of
/// the calls across tools shows. The baked image's marker is there or not
/// (`LABBOOK_BAKED_MARKER`).
#[cfg(test)]
mod script_runs {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::*;

    const HASH: &str = "$6$saltsalt$abcdefghijklmnopqrstuvwxyz";

    /// Each stub logs its call; its name is `$0`'s.
    const STUB_HEAD: &str = "#!/bin/bash\nprintf '%s %s\\n' \"${0##*/}\" \"$*\" >>\"$STUB_LOG\"\n";

    /// The tools the bootstrap calls, as a machine has them (with what each must do).
    const STUBS: &[(&str, &str)] = &[
        ("tljh-config", ""),
        ("systemctl", ""),
        ("apt-get", "[ -z \"${STUB_APT_FAILS:-}\" ] || exit 100\n"),
        ("dpkg", ""),
        // IMDSv2's token and address; any other URL is a download to the file `-o` names.
        (
            "curl",
            r#"for a in "$@"; do
  case $a in
  */latest/api/token) echo token; exit 0 ;;
  */latest/meta-data/public-ipv4) echo 203.0.113.7; exit 0 ;;
  esac
done
while [ $# -gt 0 ]; do if [ "$1" = -o ]; then echo '# the installer' >"$2"; fi; shift; done
"#,
        ),
        // `python3 -m venv` fails (certbot cannot be installed here); the installer only logs.
        ("python3", "[ \"$1\" != -m ] || exit 1\n"),
    ];

    /// certbot as a baked image holds it: it saves a certificate for the address it is asked.
    const CERTBOT_STUB: &str = r#"while [ $# -gt 0 ]; do
  case $1 in
  --config-dir) state=$2 ;;
  --ip-address) ip=$2 ;;
  esac
  shift
done
live=$state/live/labbook
mkdir -p "$live"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 -subj / \
  -addext "subjectAltName=IP:$ip" -keyout "$live/privkey.pem" -out "$live/cert.pem" 2>/dev/null
cp "$live/cert.pem" "$live/fullchain.pem"
"#;

    struct Run {
        code: Option<i32>,
        console: String,
        calls: Vec<String>,
        installer: PathBuf,
        dir: PathBuf,
    }

    impl Drop for Run {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Run {
        /// One tool's calls (its arguments), in order.
        fn of(&self, tool: &str) -> Vec<&str> {
            let head = format!("{tool} ");
            self.calls
                .iter()
                .filter_map(|c| c.strip_prefix(&head))
                .collect()
        }

        /// Where `call` (`<tool> <arguments>`) is in the log of every call.
        fn at(&self, call: &str) -> usize {
            self.calls
                .iter()
                .position(|c| c == call)
                .unwrap_or_else(|| panic!("{call:?} in {:#?}", self.calls))
        }

        /// The console's last line: the bootstrap's report.
        fn report(&self) -> &str {
            self.console.trim().lines().last().unwrap_or_default()
        }
    }

    struct Machine {
        bootstrap: Bootstrap,
        https: Https,
        baked: bool,
        certbot_installed: bool,
        apt_fails: bool,
    }

    impl Machine {
        fn jupyterhub(baked: bool) -> Self {
            Machine {
                bootstrap: Bootstrap::JupyterHub,
                https: Https::Off,
                baked,
                certbot_installed: false,
                apt_fails: false,
            }
        }

        /// Renders the user-data for the admin and two trainees, then runs its script as its
        /// `runcmd` says.
        fn boot(&self) -> Run {
            let admin = Account {
                username: "labadmin",
                password_hash: HASH,
            };
            let users = [
                Account {
                    username: "ualice",
                    password_hash: HASH,
                },
                Account {
                    username: "ubob",
                    password_hash: HASH,
                },
            ];
            let out = render(self.bootstrap, &self.https, &admin, &users).unwrap();
            let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
            let script = v["write_files"][0]["content"].as_str().unwrap();
            let run: Vec<&str> = v["runcmd"][0]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert_eq!(run[0], BOOTSTRAP_PATH);

            let dir = std::env::temp_dir().join(format!("labbook-run-{}", uuid::Uuid::new_v4()));
            let (bin, acme_home) = (dir.join("bin"), dir.join("certbot"));
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::create_dir_all(acme_home.join("bin")).unwrap();
            let stub = |path: PathBuf, body: &str| {
                std::fs::write(&path, format!("{STUB_HEAD}{body}")).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            };
            for (name, body) in STUBS {
                stub(bin.join(name), body);
            }
            if self.certbot_installed {
                std::fs::write(
                    acme_home.join("labbook-version"),
                    format!("{CERTBOT_VERSION}\n"),
                )
                .unwrap();
                stub(acme_home.join("bin/certbot"), CERTBOT_STUB);
            }
            let marker = dir.join("baked");
            if self.baked {
                std::fs::write(
                    &marker,
                    "labbook_version=0.1.0\nholds=tljh,certbot 5.8.0\nbaked_at=2026-12-01T08:00:00Z\n",
                )
                .unwrap();
            }
            std::fs::write(dir.join("bootstrap"), script).unwrap();
            let installer = dir.join("tljh-bootstrap.py");
            let log = dir.join("calls");
            let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
            let mut command = std::process::Command::new("bash");
            command
                .arg(dir.join("bootstrap"))
                .args(&run[1..])
                .env("PATH", path)
                .env("STUB_LOG", &log)
                .env("LABBOOK_CONSOLE", dir.join("console"))
                .env("LABBOOK_BOOTSTRAP_LOG", dir.join("log"))
                .env("LABBOOK_BAKED_MARKER", &marker)
                .env("LABBOOK_TLJH_URL", "https://tljh.invalid/bootstrap.py")
                .env("LABBOOK_TLJH_INSTALLER", &installer)
                .env("LABBOOK_IMDS_URL", "http://imds.invalid")
                .env("LABBOOK_ACME_HOME", &acme_home)
                .env("LABBOOK_ACME_STATE", dir.join("acme"))
                .env("LABBOOK_TLS_DIR", dir.join("tls"))
                .env("LABBOOK_RETRY_SECONDS", "0");
            if self.apt_fails {
                command.env("STUB_APT_FAILS", "1");
            }
            let status = command.status().unwrap();
            Run {
                code: status.code(),
                console: std::fs::read_to_string(dir.join("console")).unwrap_or_default(),
                calls: std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect(),
                installer,
                dir,
            }
        }
    }

    /// What every JupyterHub machine tells TLJH: exactly the booking's logins and the admin.
    const LOGINS: [&str; 6] = [
        "set auth.type jupyterhub.auth.PAMAuthenticator",
        "add-item users.allowed labadmin",
        "add-item users.allowed ualice",
        "add-item users.allowed ubob",
        "add-item users.admin labadmin",
        "reload",
    ];

    #[test]
    fn a_baked_machine_sets_the_logins_and_installs_nothing() {
        let run = Machine::jupyterhub(true).boot();
        assert_eq!(run.code, Some(0), "{}", run.console);
        assert_eq!(run.report(), REPORT_OK);
        // The proxy first (the hub's reload waits for it to answer), then the logins.
        let mut expected = vec!["reload proxy"];
        expected.extend(LOGINS);
        assert_eq!(run.of("tljh-config"), expected);
        // No installer fetched or run, no apt.
        assert_eq!(run.of("curl"), Vec::<&str>::new());
        assert_eq!(run.of("python3"), Vec::<&str>::new());
        assert_eq!(run.of("apt-get"), Vec::<&str>::new());
        assert!(!run.installer.exists());
        // The image's hub and proxy serve nothing before the logins are set, then start at
        // each boot.
        assert_eq!(
            run.of("systemctl"),
            ["stop jupyterhub traefik", "enable jupyterhub traefik"]
        );
        assert!(run.at("systemctl stop jupyterhub traefik") < run.at("tljh-config reload proxy"));
        assert!(run.at("tljh-config reload") < run.at("systemctl enable jupyterhub traefik"));
        // The fast path says so on a line of its own, which is not a report.
        let note = run
            .console
            .lines()
            .find(|l| l.starts_with("labbook-baked: "))
            .unwrap_or_else(|| panic!("the fast path's line in {:?}", run.console));
        assert_eq!(
            note,
            "labbook-baked: labbook_version=0.1.0 holds=tljh,certbot 5.8.0 \
             baked_at=2026-12-01T08:00:00Z - the install is skipped"
        );
        assert!(!note.contains(REPORT_OK) && !note.contains(REPORT_FAILED.trim()));
    }

    #[test]
    fn a_plain_machine_installs_the_packages_then_the_littlest_jupyterhub() {
        let run = Machine::jupyterhub(false).boot();
        assert_eq!(run.code, Some(0), "{}", run.console);
        assert_eq!(run.report(), REPORT_OK);
        assert!(!run.console.contains("labbook-baked"), "{}", run.console);
        let lock = "-o DPkg::Lock::Timeout=300";
        assert_eq!(
            run.of("apt-get"),
            [
                format!("-q {lock} update"),
                format!(
                    "-q -y {lock} -o Dpkg::Options::=--force-confdef \
                     -o Dpkg::Options::=--force-confold install curl python3 python3-dev git"
                ),
            ]
        );
        assert_eq!(
            run.of("curl"),
            [format!(
                "-fsSL --connect-timeout 20 --max-time 300 -o {} https://tljh.invalid/bootstrap.py",
                run.installer.display()
            )]
        );
        assert_eq!(
            run.of("python3"),
            [format!(
                "{} --admin labadmin --user-requirements-txt-url ",
                run.installer.display()
            )]
        );
        // The packages, then the installer, then the logins; TLJH's installer starts its own
        // services.
        assert!(
            run.at(&format!(
                "apt-get -q -y {lock} -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold install curl python3 python3-dev git"
            )) < run.at(&format!("curl {}", run.of("curl")[0]))
        );
        assert_eq!(run.of("tljh-config"), LOGINS);
        assert_eq!(run.of("systemctl"), Vec::<&str>::new());
        assert_eq!(run.of("dpkg"), Vec::<&str>::new(), "nothing to repair");
    }

    #[test]
    fn a_plain_machine_whose_packages_cannot_be_had_retries_then_goes_on() {
        let run = Machine {
            apt_fails: true,
            ..Machine::jupyterhub(false)
        }
        .boot();
        // As when cloud-init's install failed: the rest runs, and a missing tool fails its own
        // step (here the stubs stand in for them).
        assert_eq!(run.code, Some(0), "{}", run.console);
        let updates = run.of("apt-get");
        assert_eq!(updates.len(), 3, "{updates:?}");
        assert!(updates.iter().all(|c| c.ends_with(" update")));
        // Between the tries (not after the last), dpkg finishes what a killed try left.
        let repair = "dpkg --force-confdef --force-confold --configure -a";
        let calls: Vec<&str> = run
            .calls
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with("apt-get ") || c.starts_with("dpkg "))
            .collect();
        let update = "apt-get -q -o DPkg::Lock::Timeout=300 update";
        assert_eq!(calls, [update, repair, update, repair, update]);
        assert_eq!(
            run.of("python3").len(),
            1,
            "the installer runs all the same"
        );
        let log = std::fs::read_to_string(run.dir.join("log")).unwrap();
        assert!(
            log.contains("could not install curl python3 python3-dev git"),
            "{log}"
        );
    }

    #[test]
    fn a_baked_machine_with_https_keeps_its_certbot_and_frees_port_80_for_it() {
        let run = Machine {
            https: Https::Acme(AcmeSettings {
                directory: crate::config::LETS_ENCRYPT_DIRECTORY.into(),
                email: None,
            }),
            certbot_installed: true,
            ..Machine::jupyterhub(true)
        }
        .boot();
        assert_eq!(run.code, Some(0), "{}", run.console);
        assert_eq!(run.report(), REPORT_OK);
        // The image's certbot is kept: no venv made, nothing installed.
        assert_eq!(run.of("python3"), Vec::<&str>::new());
        assert_eq!(run.of("apt-get"), Vec::<&str>::new());
        let certbot: Vec<&String> = run
            .calls
            .iter()
            .filter(|c| c.starts_with("certbot "))
            .collect();
        assert_eq!(certbot.len(), 1, "{:#?}", run.calls);
        assert!(
            certbot[0].contains("--ip-address 203.0.113.7"),
            "{}",
            certbot[0]
        );
        // The image's proxy is stopped before certbot's challenge on port 80, started after.
        let order = [
            run.at("systemctl stop jupyterhub traefik"),
            run.at(certbot[0]),
            run.at("tljh-config reload proxy"),
            run.at("tljh-config add-item users.admin labadmin"),
            run.at("tljh-config reload"),
            run.at("tljh-config set https.enabled true"),
            run.at("systemctl enable jupyterhub traefik"),
        ];
        assert!(order.is_sorted(), "{order:?} in {:#?}", run.calls);
        assert_eq!(
            run.of("tljh-config").last(),
            Some(&"reload proxy"),
            "HTTPS is served"
        );
        assert!(run.dir.join("tls/fullchain.pem").exists());
    }

    #[test]
    fn an_ssh_machine_keeps_a_baked_images_jupyterhub_off() {
        let run = Machine {
            bootstrap: Bootstrap::Ssh,
            ..Machine::jupyterhub(true)
        }
        .boot();
        assert_eq!(run.code, Some(0), "{}", run.console);
        assert_eq!(run.console.trim(), REPORT_OK);
        assert_eq!(run.calls, ["systemctl disable --now jupyterhub traefik"]);
        let plain = Machine {
            bootstrap: Bootstrap::Ssh,
            ..Machine::jupyterhub(false)
        }
        .boot();
        assert_eq!(plain.code, Some(0), "{}", plain.console);
        assert_eq!(
            plain.calls,
            Vec::<String>::new(),
            "a plain image: nothing to stop"
        );
    }
}
