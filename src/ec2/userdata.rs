//! The instance bootstrap: cloud-init user-data that creates the slot's admin and users from
//! SHA-512-crypt hashes. Every process on an instance can read its user-data, so it never
//! holds a plaintext password.
//!
//! What cloud-init cannot do by itself runs as one bash script ([`BOOTSTRAP_PATH`]) with
//! `set -eu -o pipefail`: downloads retried with backoff, the JupyterHub install bounded in
//! time, and the outcome written as one line to the serial console, which EC2's
//! `GetConsoleOutput` returns without any network path to the machine:
//! `labbook-bootstrap: ok`, or `labbook-bootstrap: failed: <step> (exit <code>)`.

use serde::Serialize;

use crate::config::Bootstrap;

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

/// The part of the bootstrap every mode runs: strict mode, the report, the trap that reports
/// the failing step. `LABBOOK_CONSOLE` exists for tests of the script; on an instance it is
/// the serial console (`LABBOOK_BOOTSTRAP_LOG` likewise).
const SCRIPT_HEAD: &str = r#"#!/bin/bash
# labbook's instance bootstrap: run by cloud-init once the accounts exist. Its outcome is one
# line on the serial console: "labbook-bootstrap: ok" or "labbook-bootstrap: failed: <step>".
set -eu -o pipefail -o errtrace
console=${LABBOOK_CONSOLE:-/dev/console}
log=${LABBOOK_BOOTSTRAP_LOG:-/var/log/labbook-bootstrap.log}
report() { printf '\nlabbook-bootstrap: %s\n' "$1" | tee -a "$log" >"$console" 2>/dev/null || true; }
step="start"
trap 'code=$?; report "failed: $step (exit $code)"; exit $code' ERR
mode=$1 admin=$2
shift 2
"#;

/// The JupyterHub part: download TLJH's installer with retries and backoff, install it within
/// 25 minutes, allow exactly the slot's logins. `LABBOOK_TLJH_URL` and
/// `LABBOOK_RETRY_SECONDS` exist for tests of the script.
const SCRIPT_JUPYTERHUB: &str = r#"if [ "$mode" = jupyterhub ]; then
  step="download The Littlest JupyterHub's installer"
  url=${LABBOOK_TLJH_URL:-https://tljh.jupyter.org/bootstrap.py}
  pause=${LABBOOK_RETRY_SECONDS:-10}
  for try in 1 2 3 4 5 6; do
    got=0
    curl -fsSL --connect-timeout 20 --max-time 300 -o /root/tljh-bootstrap.py "$url" || got=$?
    if [ "$got" -eq 0 ]; then break; fi
    # The last try fails the step with curl's own exit code.
    if [ "$try" -eq 6 ]; then (exit "$got"); fi
    sleep $((pause * try))
  done
  step="install The Littlest JupyterHub"
  timeout 1500 python3 /root/tljh-bootstrap.py --admin "$admin" --user-requirements-txt-url ''
  step="allow the booking's logins"
  tljh-config set auth.type jupyterhub.auth.PAMAuthenticator
  for name in "$admin" "$@"; do tljh-config add-item users.allowed "$name"; done
  tljh-config add-item users.admin "$admin"
  tljh-config reload
fi
"#;

const SCRIPT_TAIL: &str = r#"step="finish"
report ok
"#;

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

/// Renders the `#cloud-config` user-data for one slot.
pub fn render(
    bootstrap: Bootstrap,
    admin: &Account<'_>,
    users: &[Account<'_>],
) -> Result<String, String> {
    let mut accounts = vec![User::Default("default"), account(admin, true)];
    accounts.extend(users.iter().map(|u| account(u, false)));

    let mode = match bootstrap {
        Bootstrap::JupyterHub => "jupyterhub",
        Bootstrap::Ssh => "ssh",
    };
    let mut script = String::from(SCRIPT_HEAD);
    if bootstrap == Bootstrap::JupyterHub {
        script.push_str(SCRIPT_JUPYTERHUB);
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
            packages: Vec::new(),
            write_files,
            runcmd: vec![run],
        },
        Bootstrap::JupyterHub => CloudConfig {
            users: accounts,
            ssh_pwauth: false,
            package_update: Some(true),
            packages: vec!["curl", "python3", "python3-dev", "git"],
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
        let out = render(Bootstrap::JupyterHub, &admin, &users).unwrap();
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
        let out = render(Bootstrap::Ssh, &admin, &[]).unwrap();
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
        assert_eq!(v["ssh_pwauth"].as_bool(), Some(true));
        assert!(!out.contains("tljh"));
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
            render(Bootstrap::Ssh, &admin, &users)
                .unwrap_err()
                .contains("LABBOOK_USERS_PER_INSTANCE")
        );
    }
}
