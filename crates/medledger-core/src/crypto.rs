//! ECDSA P-256 over SHA-256: the one signature scheme of the ledger.
//!
//! Verification only: signing needs randomness and key storage, which live in the shell.
//! Keys travel as uncompressed SEC1 points and signatures as the 64-byte `r || s` form
//! (IEEE P1363), which is what WebCrypto produces, both in unpadded base64url.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::hash::Hash;

/// Length of an uncompressed SEC1 P-256 point: `0x04 || x || y`.
pub const PUBLIC_KEY_BYTES: usize = 65;
/// Length of a fixed-size ECDSA P-256 signature: `r || s`.
pub const SIGNATURE_BYTES: usize = 64;

/// A P-256 public key as an uncompressed SEC1 point.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; PUBLIC_KEY_BYTES]);

/// An ECDSA P-256 SHA-256 signature in fixed `r || s` form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_BYTES]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a public key is a 65-byte uncompressed P-256 point starting with 0x04")]
    BadPublicKey,
    #[error("a signature is 64 bytes (r || s)")]
    BadSignature,
    #[error("not valid unpadded base64url")]
    BadBase64,
}

impl PublicKey {
    /// Accepts an uncompressed SEC1 point. Whether it lies on the curve is checked by
    /// `verify`, which refuses every signature for a point that does not.
    pub fn from_sec1(bytes: &[u8]) -> Result<PublicKey, KeyError> {
        let array: [u8; PUBLIC_KEY_BYTES] = bytes.try_into().map_err(|_| KeyError::BadPublicKey)?;
        if array[0] != 0x04 {
            return Err(KeyError::BadPublicKey);
        }
        Ok(PublicKey(array))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// SHA-256 of the SEC1 bytes; used to name keys without repeating them.
    pub fn fingerprint(&self) -> Hash {
        Hash::digest(&self.0)
    }

    /// True when `signature` is a valid ECDSA P-256 SHA-256 signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &self.0)
            .verify(message, &signature.0)
            .is_ok()
    }

    pub fn to_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_base64url(text: &str) -> Result<PublicKey, KeyError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| KeyError::BadBase64)?;
        PublicKey::from_sec1(&bytes)
    }
}

impl Signature {
    pub fn from_bytes(bytes: &[u8]) -> Result<Signature, KeyError> {
        Ok(Signature(
            bytes.try_into().map_err(|_| KeyError::BadSignature)?,
        ))
    }

    pub fn to_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn from_base64url(text: &str) -> Result<Signature, KeyError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| KeyError::BadBase64)?;
        Signature::from_bytes(&bytes)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64url())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.to_base64url())
    }
}

/// Serde for a binary value as unpadded base64url text, through the type's own
/// `to_base64url` and `from_base64url` (whose error is `Display`).
#[macro_export]
macro_rules! base64url_serde {
    ($type:ty) => {
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.to_base64url())
            }
        }
        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(
                deserializer: D,
            ) -> Result<$type, D::Error> {
                let text =
                    <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
                <$type>::from_base64url(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

base64url_serde!(PublicKey);
base64url_serde!(Signature);

/// Unpadded base64url, the encoding of every binary value in ledger JSON.
pub fn base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn from_base64url(text: &str) -> Result<Vec<u8>, KeyError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| KeyError::BadBase64)
}
