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
# certificate; the certificate itself is checked instead. Sets why when there is none.
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
  if grep -q 'rateLimited' "$out"; then
    why="rate limited by the ACME server"
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

/// The JupyterHub part: install TLJH ([`SCRIPT_TLJH_INSTALL`]), allow exactly the slot's
/// logins, then serve HTTPS if a certificate was had.
const SCRIPT_JUPYTERHUB_START: &str = r#"if [ "$mode" = jupyterhub ]; then
  # Before TLJH's proxy listens on port 80, which the ACME challenge needs.
  if [ "$https" = on ]; then obtain_certificate; fi
"#;

const SCRIPT_JUPYTERHUB_END: &str = r#"  step="allow the booking's logins"
  tljh-config set auth.type jupyterhub.auth.PAMAuthenticator
  for name in "$admin" "$@"; do tljh-config add-item users.allowed "$name"; done
  tljh-config add-item users.admin "$admin"
  tljh-config reload
  if [ -n "$tls_ready" ]; then serve_https; fi
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

/// The marker, then the seal: a machine made from the image must be a new machine to
/// cloud-init (its state, logs and machine id cleared), with SSH host keys of its own
/// (cloud-init makes them at its first boot). The rest of this boot's cloud-init run writes a
/// little state again after the clean; a machine from the image has another instance id, so
/// cloud-init runs its first-boot modules all the same. `LABBOOK_IMAGE_ROOT` and
/// `LABBOOK_BAKED_MARKER` exist for tests of the script.
const IMAGE_BAKE_END: &str = r#"root=${LABBOOK_IMAGE_ROOT:-}
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
        script.push_str(SCRIPT_JUPYTERHUB_START);
        script.push_str(SCRIPT_TLJH_INSTALL);
        script.push_str(SCRIPT_JUPYTERHUB_END);
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
        Bootstrap::JupyterHub => CloudConfig {
            users: accounts,
            ssh_pwauth: false,
            package_update: Some(true),
            package_upgrade: None,
            packages: if acme.is_some() {
                [JUPYTERHUB_PACKAGES, HTTPS_PACKAGES].concat()
            } else {
                JUPYTERHUB_PACKAGES.to_vec()
            },
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
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
        let packages: Vec<&str> = v["packages"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        assert!(packages.contains(&"python3-venv"), "{packages:?}");
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
