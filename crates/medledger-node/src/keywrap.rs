//! Record keys wrapped for their readers.
//!
//! Every record version is encrypted under its own fresh data key (`sealing`). That key is
//! never stored as it is: it is wrapped for each party that may read the version (the
//! custodian organisation, the patient, a requester granted access) with HPKE (RFC 9180)
//! in base mode, suite DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, the
//! standard form of "ECDH P-256 + HKDF-SHA256 + AES-GCM" (`hpke` crate). The HPKE `info`
//! binds the wrapped key to the record, version, custodian and recipient it was made for,
//! so a wrapped key moved to another record or recipient does not open.
//!
//! Encryption key pairs are separate from the P-256 signing keys of the same parties: one
//! key, one purpose.

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::DhP256HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};

type Suite = DhP256HkdfSha256;
type PrivateKey = <Suite as Kem>::PrivateKey;
type PublicKey = <Suite as Kem>::PublicKey;
type EncappedKey = <Suite as Kem>::EncappedKey;

/// Bytes of a data key.
pub const DATA_KEY_BYTES: usize = 32;
/// Bytes of an encryption public key: a SEC1 uncompressed P-256 point.
pub const PUBLIC_KEY_BYTES: usize = 65;
/// Bytes of an encryption secret key: a P-256 scalar.
pub const SECRET_KEY_BYTES: usize = 32;
/// Bytes of a wrapped data key: the encapsulated key, the encrypted data key and its tag.
pub const WRAPPED_KEY_BYTES: usize = PUBLIC_KEY_BYTES + DATA_KEY_BYTES + 16;

const INFO_LABEL: &[u8] = b"medledger record key v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WrapError {
    #[error("an encryption public key is {PUBLIC_KEY_BYTES} bytes (an uncompressed P-256 point)")]
    BadPublicKey,
    #[error("an encryption secret key is {SECRET_KEY_BYTES} bytes (a nonzero P-256 scalar)")]
    BadSecretKey,
    #[error("a wrapped key is {WRAPPED_KEY_BYTES} bytes")]
    BadWrappedKey,
    #[error("the wrapped key does not open with this key for this record and recipient")]
    WrongKeyOrContext,
    #[error("wrapping the key failed")]
    Wrap,
}

/// Where a wrapped key belongs: it opens only for this record version and recipient.
#[derive(Debug, Clone, Copy)]
pub struct WrapContext<'a> {
    pub record: &'a str,
    pub version: u64,
    pub custodian: &'a str,
    /// The party the key is wrapped for (an organisation or a patient pseudonym).
    pub recipient: &'a str,
}

impl WrapContext<'_> {
    /// The HPKE `info`: a label, then each field length-prefixed, so no two contexts share
    /// an encoding.
    fn info(&self) -> Vec<u8> {
        let version = self.version.to_be_bytes();
        let fields: [&[u8]; 4] = [
            self.record.as_bytes(),
            &version,
            self.custodian.as_bytes(),
            self.recipient.as_bytes(),
        ];
        let mut info = INFO_LABEL.to_vec();
        for field in fields {
            info.extend_from_slice(&(field.len() as u32).to_be_bytes());
            info.extend_from_slice(field);
        }
        info
    }
}

/// An encryption key pair (P-256, for HPKE only).
#[derive(Clone)]
pub struct EncryptionKeyPair {
    secret: PrivateKey,
    public: PublicKey,
}

impl std::fmt::Debug for EncryptionKeyPair {
    /// Shows the public half only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionKeyPair")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl EncryptionKeyPair {
    pub fn generate() -> EncryptionKeyPair {
        let (secret, public) = Suite::gen_keypair(&mut rand_core::UnwrapErr(rand_core::OsRng));
        EncryptionKeyPair { secret, public }
    }

    /// The key pair of a stored secret scalar.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<EncryptionKeyPair, WrapError> {
        if bytes.len() != SECRET_KEY_BYTES {
            return Err(WrapError::BadSecretKey);
        }
        let secret = PrivateKey::from_bytes(bytes).map_err(|_| WrapError::BadSecretKey)?;
        let public = Suite::sk_to_pk(&secret);
        Ok(EncryptionKeyPair { secret, public })
    }

    /// The secret scalar, for the key file (kept with restrictive permissions).
    pub fn secret_bytes(&self) -> [u8; SECRET_KEY_BYTES] {
        let mut out = [0u8; SECRET_KEY_BYTES];
        out.copy_from_slice(&self.secret.to_bytes());
        out
    }

    pub fn public_key(&self) -> EncryptionPublicKey {
        EncryptionPublicKey(self.public.to_bytes().to_vec())
    }

    /// Opens a data key wrapped for this key pair in `context`.
    pub fn unwrap_key(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext<'_>,
    ) -> Result<[u8; DATA_KEY_BYTES], WrapError> {
        let bytes = &wrapped.0;
        if bytes.len() != WRAPPED_KEY_BYTES {
            return Err(WrapError::BadWrappedKey);
        }
        let (encapped, sealed) = bytes.split_at(PUBLIC_KEY_BYTES);
        let encapped = EncappedKey::from_bytes(encapped).map_err(|_| WrapError::BadWrappedKey)?;
        let opened = hpke::single_shot_open::<AesGcm256, HkdfSha256, Suite>(
            &OpModeR::Base,
            &self.secret,
            &encapped,
            &context.info(),
            sealed,
            b"",
        )
        .map_err(|_| WrapError::WrongKeyOrContext)?;
        opened.try_into().map_err(|_| WrapError::WrongKeyOrContext)
    }
}

/// An encryption public key: a SEC1 uncompressed P-256 point, base64url in JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionPublicKey(Vec<u8>);

impl EncryptionPublicKey {
    /// Checks that `bytes` are a point on the curve.
    pub fn from_bytes(bytes: &[u8]) -> Result<EncryptionPublicKey, WrapError> {
        if bytes.len() != PUBLIC_KEY_BYTES {
            return Err(WrapError::BadPublicKey);
        }
        PublicKey::from_bytes(bytes).map_err(|_| WrapError::BadPublicKey)?;
        Ok(EncryptionPublicKey(bytes.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_base64url(&self) -> String {
        medledger_core::crypto::base64url(&self.0)
    }

    pub fn from_base64url(text: &str) -> Result<EncryptionPublicKey, WrapError> {
        let bytes =
            medledger_core::crypto::from_base64url(text).map_err(|_| WrapError::BadPublicKey)?;
        EncryptionPublicKey::from_bytes(&bytes)
    }

    /// Wraps `data_key` so that only the holder of this key's pair opens it, in `context`.
    pub fn wrap_key(
        &self,
        data_key: &[u8; DATA_KEY_BYTES],
        context: &WrapContext<'_>,
    ) -> Result<WrappedKey, WrapError> {
        let public = PublicKey::from_bytes(&self.0).map_err(|_| WrapError::BadPublicKey)?;
        let (encapped, sealed) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, Suite, _>(
            &OpModeS::Base,
            &public,
            &context.info(),
            data_key,
            b"",
            &mut rand_core::UnwrapErr(rand_core::OsRng),
        )
        .map_err(|_| WrapError::Wrap)?;
        let mut bytes = encapped.to_bytes().to_vec();
        bytes.extend_from_slice(&sealed);
        Ok(WrappedKey(bytes))
    }
}

medledger_core::base64url_serde!(EncryptionPublicKey);

/// A data key wrapped for one recipient: the HPKE encapsulated key, then the sealed data key
/// (base64url in JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

impl WrappedKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<WrappedKey, WrapError> {
        if bytes.len() != WRAPPED_KEY_BYTES {
            return Err(WrapError::BadWrappedKey);
        }
        Ok(WrappedKey(bytes.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_base64url(&self) -> String {
        medledger_core::crypto::base64url(&self.0)
    }

    pub fn from_base64url(text: &str) -> Result<WrappedKey, WrapError> {
        let bytes =
            medledger_core::crypto::from_base64url(text).map_err(|_| WrapError::BadWrappedKey)?;
        WrappedKey::from_bytes(&bytes)
    }
}

medledger_core::base64url_serde!(WrappedKey);

#[cfg(test)]
mod tests {
    use super::*;

    const CONTEXT: WrapContext<'static> = WrapContext {
        record: "obs-1",
        version: 1,
        custodian: "hospital-a",
        recipient: "hospital-a",
    };

    #[test]
    fn a_wrapped_key_opens_for_its_recipient_and_context_only() {
        // Proves the envelope: the recipient's key pair opens the data key in the context it
        // was wrapped for; another key pair, another record, version, custodian or recipient,
        // and any flipped byte of the wrapped key are refused.
        let recipient = EncryptionKeyPair::generate();
        let data_key = [7u8; DATA_KEY_BYTES];
        let wrapped = recipient
            .public_key()
            .wrap_key(&data_key, &CONTEXT)
            .unwrap();
        assert_eq!(wrapped.as_bytes().len(), WRAPPED_KEY_BYTES);
        assert_eq!(recipient.unwrap_key(&wrapped, &CONTEXT), Ok(data_key));

        let stranger = EncryptionKeyPair::generate();
        assert_eq!(
            stranger.unwrap_key(&wrapped, &CONTEXT),
            Err(WrapError::WrongKeyOrContext)
        );
        let elsewhere = [
            WrapContext {
                record: "obs-2",
                ..CONTEXT
            },
            WrapContext {
                version: 2,
                ..CONTEXT
            },
            WrapContext {
                custodian: "lab-x",
                ..CONTEXT
            },
            WrapContext {
                recipient: "clinic-b",
                ..CONTEXT
            },
            // Length prefixes: moving a character between fields is another context.
            WrapContext {
                record: "obs-1h",
                custodian: "ospital-a",
                ..CONTEXT
            },
        ];
        for context in &elsewhere {
            assert_eq!(
                recipient.unwrap_key(&wrapped, context),
                Err(WrapError::WrongKeyOrContext),
                "{context:?}"
            );
        }
        for position in 0..WRAPPED_KEY_BYTES {
            let mut bytes = wrapped.as_bytes().to_vec();
            bytes[position] ^= 0x01;
            let tampered = WrappedKey::from_bytes(&bytes).unwrap();
            assert!(
                recipient.unwrap_key(&tampered, &CONTEXT).is_err(),
                "byte {position}"
            );
        }
    }

    #[test]
    fn wrapping_twice_gives_different_envelopes_of_the_same_key() {
        // Proves each wrap uses a fresh ephemeral key: two envelopes of one data key differ
        // and both open to it.
        let recipient = EncryptionKeyPair::generate();
        let data_key = [9u8; DATA_KEY_BYTES];
        let first = recipient
            .public_key()
            .wrap_key(&data_key, &CONTEXT)
            .unwrap();
        let second = recipient
            .public_key()
            .wrap_key(&data_key, &CONTEXT)
            .unwrap();
        assert_ne!(first, second);
        assert_eq!(recipient.unwrap_key(&first, &CONTEXT), Ok(data_key));
        assert_eq!(recipient.unwrap_key(&second, &CONTEXT), Ok(data_key));
    }

    #[test]
    fn keys_survive_their_encodings_and_bad_encodings_are_refused() {
        // Proves the stored forms: a key pair rebuilt from its secret bytes opens what was
        // wrapped for the original; public and wrapped keys round-trip through JSON; wrong
        // lengths, a point off the curve and a zero scalar are refused.
        let pair = EncryptionKeyPair::generate();
        let again = EncryptionKeyPair::from_secret_bytes(&pair.secret_bytes()).unwrap();
        assert_eq!(again.public_key(), pair.public_key());
        let wrapped = pair.public_key().wrap_key(&[1; 32], &CONTEXT).unwrap();
        assert_eq!(again.unwrap_key(&wrapped, &CONTEXT), Ok([1; 32]));

        let json = serde_json::to_string(&pair.public_key()).unwrap();
        let back: EncryptionPublicKey = serde_json::from_str(&json).unwrap();
        assert_eq!(back, pair.public_key());
        let json = serde_json::to_string(&wrapped).unwrap();
        let back: WrappedKey = serde_json::from_str(&json).unwrap();
        assert_eq!(back, wrapped);

        assert_eq!(
            EncryptionKeyPair::from_secret_bytes(&[0; 32]).unwrap_err(),
            WrapError::BadSecretKey
        );
        assert_eq!(
            EncryptionKeyPair::from_secret_bytes(&[1; 31]).unwrap_err(),
            WrapError::BadSecretKey
        );
        let mut off_curve = pair.public_key().as_bytes().to_vec();
        off_curve[64] ^= 0x01;
        assert_eq!(
            EncryptionPublicKey::from_bytes(&off_curve),
            Err(WrapError::BadPublicKey)
        );
        assert_eq!(
            EncryptionPublicKey::from_bytes(&[4; 33]),
            Err(WrapError::BadPublicKey)
        );
        assert!(serde_json::from_str::<WrappedKey>("\"AAAA\"").is_err());
        assert!(serde_json::from_str::<EncryptionPublicKey>("\"!!\"").is_err());
    }
}
