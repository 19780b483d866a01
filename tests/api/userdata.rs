//! The user-data passes cloud-init's own schema check, for both bootstraps.

use std::process::Command;

use labbook::config::Bootstrap;
use labbook::domain::Credential;
use labbook::ec2::userdata::{Account, render};

fn schema_check(user_data: &str) {
    let dir = std::env::temp_dir().join(format!("labbook-ud-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("user-data");
    std::fs::write(&file, user_data).unwrap();
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&file)
        .output()
        .expect("cloud-init is installed (scripts/services.sh installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "cloud-init schema: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn both_bootstraps_pass_the_cloud_init_schema() {
    let creds = Credential::generate_set(3);
    let hashes: Vec<String> = creds.iter().map(|c| c.password.sha512_crypt()).collect();
    let users: Vec<Account<'_>> = creds
        .iter()
        .zip(&hashes)
        .map(|(c, h)| Account {
            username: c.username.as_str(),
            password_hash: h,
        })
        .collect();
    let admin_hash = labbook::domain::Password::generate().sha512_crypt();
    let admin = Account {
        username: "labadmin",
        password_hash: &admin_hash,
    };
    for bootstrap in [Bootstrap::JupyterHub, Bootstrap::Ssh] {
        let data = render(bootstrap, &admin, &users).unwrap();
        schema_check(&data);
        for c in &creds {
            assert!(!data.contains(c.password.expose()));
        }
    }
}
