//! Encryption of stored passwords with `LABBOOK_SECRET_KEY` (XChaCha20-Poly1305).
//!
//! A stored value is `nonce (24 bytes) || ciphertext+tag`. The associated data binds it to the
//! booking and login it belongs to, so a ciphertext copied to another row does not decrypt.

use std::fmt;

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

use crate::broker::StageError;
use crate::domain::Password;

const NONCE_LEN: usize = 24;

/// The 32-byte key. `Debug` does not show it.
#[derive(Clone)]
pub struct SecretKey(Key);

impl SecretKey {
    pub fn from_base64(raw: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(raw.trim())
            .map_err(|_| "is not valid base64 (expected 32 random bytes in base64)".to_string())?;
        if bytes.len() != 32 {
            return Err(format!("must decode to 32 bytes (got {})", bytes.len()));
        }
        Ok(Self(*Key::from_slice(&bytes)))
    }

    /// A fresh random key, base64-encoded (for `labbook` set-up and tests).
    pub fn generate_base64() -> String {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        base64::engine::general_purpose::STANDARD.encode(key)
    }

    pub fn encrypt(&self, password: &Password, context: &str) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new(&self.0);
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: password.expose().as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("encryption with a valid key cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn decrypt(&self, stored: &[u8], context: &str) -> Result<Password, DecryptError> {
        if stored.len() < NONCE_LEN {
            return Err(DecryptError);
        }
        let (nonce, ciphertext) = stored.split_at(NONCE_LEN);
        let cipher = XChaCha20Poly1305::new(&self.0);
        let plain = cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| DecryptError)?;
        String::from_utf8(plain)
            .map(Password::from_plaintext)
            .map_err(|_| DecryptError)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

/// The associated data a trainee's stored password is encrypted under.
pub fn password_context(booking_id: &str, username: &str) -> String {
    format!("{booking_id}/{username}")
}

/// The associated data a slot's stored admin password is encrypted under.
pub fn admin_context(booking_id: &str, slot: i32) -> String {
    format!("{booking_id}/slot-{slot}/admin")
}

/// A stored password could not be decrypted: wrong `LABBOOK_SECRET_KEY`, or a damaged row.
#[derive(Debug, thiserror::Error)]
#[error(
    "a stored password could not be decrypted (is LABBOOK_SECRET_KEY the one it was stored with?)"
)]
pub struct DecryptError;

/// Retrying does not change the key: dead-letter, and the operator fixes the key.
impl From<DecryptError> for StageError {
    fn from(err: DecryptError) -> Self {
        StageError::Permanent(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_context_binding() {
        let key = SecretKey::from_base64(&SecretKey::generate_base64()).unwrap();
        let p = Password::generate();
        let stored = key.encrypt(&p, "b1/alice");
        assert!(
            !stored
                .windows(p.expose().len())
                .any(|w| w == p.expose().as_bytes())
        );
        assert_eq!(
            key.decrypt(&stored, "b1/alice").unwrap().expose(),
            p.expose()
        );
        assert!(key.decrypt(&stored, "b1/bob").is_err());
        let other = SecretKey::from_base64(&SecretKey::generate_base64()).unwrap();
        assert!(other.decrypt(&stored, "b1/alice").is_err());
    }

    #[test]
    fn key_must_be_32_bytes() {
        assert!(SecretKey::from_base64("c2hvcnQ=").is_err());
        assert!(SecretKey::from_base64("!!").is_err());
        assert!(
            !format!(
                "{:?}",
                SecretKey::from_base64(&SecretKey::generate_base64()).unwrap()
            )
            .contains('=')
        );
    }
}
