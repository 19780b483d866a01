//! The instance bootstrap: cloud-init user-data that creates the slot's admin and users from
//! SHA-512-crypt hashes. Every process on an instance can read its user-data, so it never
//! holds a plaintext password.

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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    runcmd: Vec<Vec<String>>,
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

/// Installs The Littlest JupyterHub with PAM logins, as the original did.
const TLJH_BOOTSTRAP: &str = "https://tljh.jupyter.org/bootstrap.py";

/// Renders the `#cloud-config` user-data for one slot.
pub fn render(
    bootstrap: Bootstrap,
    admin: &Account<'_>,
    users: &[Account<'_>],
) -> Result<String, String> {
    let mut accounts = vec![User::Default("default"), account(admin, true)];
    accounts.extend(users.iter().map(|u| account(u, false)));

    let config = match bootstrap {
        Bootstrap::Ssh => CloudConfig {
            users: accounts,
            ssh_pwauth: true,
            package_update: None,
            packages: Vec::new(),
            runcmd: Vec::new(),
        },
        Bootstrap::JupyterHub => {
            let mut runcmd = vec![
                sh(&format!(
                    "curl -fsSL {TLJH_BOOTSTRAP} | python3 - --admin {} --user-requirements-txt-url ''",
                    admin.username
                )),
                cmd(&[
                    "tljh-config",
                    "set",
                    "auth.type",
                    "jupyterhub.auth.PAMAuthenticator",
                ]),
            ];
            for name in std::iter::once(admin.username).chain(users.iter().map(|u| u.username)) {
                runcmd.push(cmd(&["tljh-config", "add-item", "users.allowed", name]));
            }
            runcmd.push(cmd(&[
                "tljh-config",
                "add-item",
                "users.admin",
                admin.username,
            ]));
            runcmd.push(cmd(&["tljh-config", "reload"]));
            CloudConfig {
                users: accounts,
                ssh_pwauth: false,
                package_update: Some(true),
                packages: vec!["curl", "python3", "python3-dev", "git"],
                runcmd,
            }
        }
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

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
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
        assert!(out.contains("users.allowed, ualice") || out.contains("- ualice"));
        assert_eq!(out.matches("users.allowed").count(), 3);
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
