//! Trainee and admin credentials: usernames, passwords that cannot be printed, and their
//! SHA-512-crypt hashes for the instance bootstrap.

use std::collections::HashSet;
use std::fmt;

use rand::distr::{Alphanumeric, SampleString};
use rand::rngs::OsRng;
use rand::{Rng, TryRngCore};
use secrecy::{ExposeSecret, SecretString};

/// Length of a generated password: 22 base62 characters carry 131 bits.
pub const PASSWORD_LEN: usize = 22;

/// A Linux login name: lowercase letter first, then `[a-z0-9_-]`, at most 32 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut chars = raw.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !first_ok || !rest_ok || raw.len() > 32 {
            return Err(format!(
                "{raw:?} is not a valid login name (lowercase letter first, then a-z 0-9 _ -, at most 32)"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A random trainee name: `u` and 13 characters of `[a-z0-9]` (67 bits), as unguessable as
    /// the 16 hex digits the original used.
    pub fn generate() -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = OsRng.unwrap_err();
        let tail: String = (0..13)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        Self(format!("u{tail}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A plaintext password. `Debug` prints `[REDACTED]`; there is no `Display`.
#[derive(Clone)]
pub struct Password(SecretString);

impl Password {
    /// 22 base62 characters from the OS CSPRNG: no characters that break in email or on paste.
    pub fn generate() -> Self {
        let mut rng = OsRng.unwrap_err();
        Self(Alphanumeric.sample_string(&mut rng, PASSWORD_LEN).into())
    }

    pub fn from_plaintext(s: String) -> Self {
        Self(s.into())
    }

    /// The plaintext, for encryption and for rendering an email: never for a log.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The SHA-512-crypt hash (`$6$…`, 5000 rounds: the default) for cloud-init's `passwd`.
    pub fn sha512_crypt(&self) -> String {
        let params = sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT)
            .expect("default rounds are valid");
        sha_crypt::sha512_simple(self.expose(), &params).expect("hashing a password cannot fail")
    }

    /// Whether `hash` (SHA-512-crypt) is this password's.
    pub fn verify(&self, hash: &str) -> bool {
        sha_crypt::sha512_check(self.expose(), hash).is_ok()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([REDACTED])")
    }
}

/// A login with its password.
#[derive(Debug, Clone)]
pub struct Credential {
    pub username: Username,
    pub password: Password,
}

impl Credential {
    /// `n` fresh credentials with usernames unique among themselves.
    pub fn generate_set(n: usize) -> Vec<Credential> {
        let mut seen = HashSet::with_capacity(n);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let username = Username::generate();
            if seen.insert(username.clone()) {
                out.push(Credential {
                    username,
                    password: Password::generate(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_usernames_are_valid_and_unique() {
        let set = Credential::generate_set(50);
        let names: HashSet<_> = set.iter().map(|c| c.username.clone()).collect();
        assert_eq!(names.len(), 50);
        for c in &set {
            assert!(
                Username::parse(c.username.as_str()).is_ok(),
                "{}",
                c.username
            );
        }
    }

    #[test]
    fn passwords_are_long_base62_and_differ() {
        let a = Password::generate();
        let b = Password::generate();
        assert_eq!(a.expose().len(), PASSWORD_LEN);
        assert!(a.expose().chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn passwords_do_not_print() {
        let p = Password::generate();
        let c = Credential {
            username: Username::parse("alice").unwrap(),
            password: p.clone(),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains(p.expose()));
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn hash_is_sha512_crypt_and_verifies() {
        let p = Password::generate();
        let hash = p.sha512_crypt();
        assert!(hash.starts_with("$6$"), "{hash}");
        assert!(p.verify(&hash));
        assert!(!Password::generate().verify(&hash));
    }

    #[test]
    fn login_names_are_checked() {
        for bad in ["", "1abc", "Abc", "a b", &"a".repeat(33), "a.b"] {
            assert!(Username::parse(bad).is_err(), "{bad}");
        }
        for good in ["labadmin", "a", "u_1-x"] {
            assert!(Username::parse(good).is_ok(), "{good}");
        }
    }
}
