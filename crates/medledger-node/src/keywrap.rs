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
//! Two forms avoid an elliptic-curve operation per version where none is needed:
//!
//! - **The custodian's own envelope** is sealed with AES-256-GCM under a key-encryption key
//!   derived (HKDF-SHA256) from the organisation's encryption secret, with the same binding
//!   as associated data. Only the holder of that secret opens it, as with HPKE, and sealing
//!   or opening costs microseconds instead of a P-256 scalar multiplication or two. Each
//!   envelope has a fresh random 96-bit nonce: under one key that stays safe for 2^32
//!   envelopes, far beyond a custodian's versions per key (rotation starts a new key).
//!   HPKE envelopes for the organisation, as earlier versions wrote them, still open.
//! - **An answer to another member** carries one HPKE encapsulation to the requester's
//!   published key (export-only mode, its `info` binding the custodian, the requester and
//!   the access entry served under); every data key in the answer is sealed under the key
//!   exported from it, with the version's binding as associated data and its position in the
//!   answer as the nonce. One key agreement per answer, not three per version.
//!
//! Encryption key pairs are separate from the P-256 signing keys of the same parties: one
//! key, one purpose.

use hpke::aead::{AesGcm256, ExportOnlyAead};
use hpke::kdf::HkdfSha256;
use hpke::kem::DhP256HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

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
/// Bytes of an AES-256-GCM tag.
const TAG_BYTES: usize = 16;
/// Bytes of a wrapped data key: the encapsulated key, the encrypted data key and its tag.
pub const WRAPPED_KEY_BYTES: usize = PUBLIC_KEY_BYTES + DATA_KEY_BYTES + TAG_BYTES;
/// Bytes of an organisation's own envelope: the nonce, the encrypted data key and its tag.
pub const OWN_ENVELOPE_BYTES: usize = NONCE_LEN + DATA_KEY_BYTES + TAG_BYTES;
/// Bytes of a data key sealed under an answer's key: the encrypted key and its tag.
pub const SEALED_KEY_BYTES: usize = DATA_KEY_BYTES + TAG_BYTES;

const INFO_LABEL: &[u8] = b"medledger record key v1";
const OWN_KEY_SALT: &[u8] = b"medledger own envelope key v1";
const ANSWER_INFO_LABEL: &[u8] = b"medledger answer keys v1";
const ANSWER_EXPORT_LABEL: &[u8] = b"medledger answer key";

/// The constructor from bytes (`valid` says which are acceptable), the accessors and the
/// base64url forms (JSON included) of a type of key material.
macro_rules! key_bytes {
    ($type:ident, $error:expr, $valid:expr) => {
        impl $type {
            pub fn from_bytes(bytes: &[u8]) -> Result<$type, WrapError> {
                let valid: fn(&[u8]) -> bool = $valid;
                if !valid(bytes) {
                    return Err($error);
                }
                Ok($type(bytes.to_vec()))
            }

            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            pub fn to_base64url(&self) -> String {
                medledger_core::crypto::base64url(&self.0)
            }

            pub fn from_base64url(text: &str) -> Result<$type, WrapError> {
                let bytes = medledger_core::crypto::from_base64url(text).map_err(|_| $error)?;
                $type::from_bytes(&bytes)
            }
        }

        medledger_core::base64url_serde!($type);
    };
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WrapError {
    #[error("an encryption public key is {PUBLIC_KEY_BYTES} bytes (an uncompressed P-256 point)")]
    BadPublicKey,
    #[error("an encryption secret key is {SECRET_KEY_BYTES} bytes (a nonzero P-256 scalar)")]
    BadSecretKey,
    #[error("a wrapped or sealed key, or an answer's key share, is malformed")]
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
    /// The HPKE `info` (and the associated data of the other forms): a label, then each
    /// field length-prefixed, so no two contexts share an encoding.
    fn info(&self) -> Vec<u8> {
        let version = self.version.to_be_bytes();
        labelled(
            INFO_LABEL,
            &[
                self.record.as_bytes(),
                &version,
                self.custodian.as_bytes(),
                self.recipient.as_bytes(),
            ],
        )
    }
}

/// `label`, then each field with its length before it.
fn labelled(label: &[u8], fields: &[&[u8]]) -> Vec<u8> {
    let mut out = label.to_vec();
    for field in fields {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// What an answer's keys are bound to: the custodian answering, the organisation it answers
/// and the access entry it serves under.
#[derive(Debug, Clone, Copy)]
pub struct AnswerBinding<'a> {
    pub custodian: &'a str,
    pub requester: &'a str,
    pub access_tx: &'a [u8],
}

impl AnswerBinding<'_> {
    fn info(&self) -> Vec<u8> {
        labelled(
            ANSWER_INFO_LABEL,
            &[
                self.custodian.as_bytes(),
                self.requester.as_bytes(),
                self.access_tx,
            ],
        )
    }
}

/// An AES-256-GCM key that seals data keys with their binding as associated data.
#[derive(Clone)]
struct KeySealer(LessSafeKey);

impl KeySealer {
    fn new(key: UnboundKey) -> KeySealer {
        KeySealer(LessSafeKey::new(key))
    }

    fn seal(
        &self,
        nonce: [u8; NONCE_LEN],
        data_key: &[u8; DATA_KEY_BYTES],
        context: &WrapContext<'_>,
    ) -> Vec<u8> {
        let mut sealed = data_key.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.info()),
                &mut sealed,
            )
            .expect("a 32-byte key is within AES-GCM's limits");
        sealed
    }

    fn open(
        &self,
        nonce: [u8; NONCE_LEN],
        sealed: &[u8],
        context: &WrapContext<'_>,
    ) -> Result<[u8; DATA_KEY_BYTES], WrapError> {
        let mut bytes = sealed.to_vec();
        let opened = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.info()),
                &mut bytes,
            )
            .map_err(|_| WrapError::WrongKeyOrContext)?;
        (&*opened)
            .try_into()
            .map_err(|_| WrapError::WrongKeyOrContext)
    }
}

/// The nonce of the data key at `index` in an answer: each answer has a key of its own.
fn answer_nonce(index: u32) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[NONCE_LEN - 4..].copy_from_slice(&index.to_be_bytes());
    nonce
}

/// The key one answer's data keys are sealed under (see the module notes).
#[derive(Clone)]
pub struct AnswerKey(KeySealer);

impl std::fmt::Debug for AnswerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnswerKey(..)")
    }
}

impl AnswerKey {
    fn exported_from(export: impl FnOnce(&mut [u8]) -> Result<(), hpke::HpkeError>) -> Self {
        let mut key = [0u8; 32];
        export(&mut key).expect("32 bytes are within HKDF-SHA256's output");
        let answer_key = AnswerKey(KeySealer::new(
            UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte AES-256 key"),
        ));
        key.fill(0);
        answer_key
    }

    /// Seals the data key at position `index` of the answer.
    pub fn seal(
        &self,
        index: u32,
        data_key: &[u8; DATA_KEY_BYTES],
        context: &WrapContext<'_>,
    ) -> SealedKey {
        SealedKey(self.0.seal(answer_nonce(index), data_key, context))
    }

    /// Opens the data key at position `index` of the answer.
    pub fn open(
        &self,
        index: u32,
        sealed: &SealedKey,
        context: &WrapContext<'_>,
    ) -> Result<[u8; DATA_KEY_BYTES], WrapError> {
        self.0.open(answer_nonce(index), &sealed.0, context)
    }
}

/// The HPKE encapsulated key that opens an answer's key for its requester (base64url).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerKeyShare(Vec<u8>);

key_bytes!(AnswerKeyShare, WrapError::BadWrappedKey, |bytes| {
    EncappedKey::from_bytes(bytes).is_ok()
});

/// A data key sealed under an answer's key (base64url).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKey(Vec<u8>);

key_bytes!(SealedKey, WrapError::BadWrappedKey, |bytes| bytes.len()
    == SEALED_KEY_BYTES);

/// An encryption key pair (P-256, for HPKE only).
#[derive(Clone)]
pub struct EncryptionKeyPair {
    secret: PrivateKey,
    public: PublicKey,
    /// The key-encryption key of the holder's own envelopes, derived from `secret`.
    own: KeySealer,
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
        EncryptionKeyPair::of(secret, public)
    }

    fn of(secret: PrivateKey, public: PublicKey) -> EncryptionKeyPair {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, OWN_KEY_SALT)
            .extract(&secret.to_bytes());
        let okm = prk
            .expand(&[b"key-encryption key"], &AES_256_GCM)
            .expect("32 bytes are within HKDF-SHA256's output");
        EncryptionKeyPair {
            secret,
            public,
            own: KeySealer::new(UnboundKey::from(okm)),
        }
    }

    /// The key pair of a stored secret scalar.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<EncryptionKeyPair, WrapError> {
        if bytes.len() != SECRET_KEY_BYTES {
            return Err(WrapError::BadSecretKey);
        }
        let secret = PrivateKey::from_bytes(bytes).map_err(|_| WrapError::BadSecretKey)?;
        let public = Suite::sk_to_pk(&secret);
        Ok(EncryptionKeyPair::of(secret, public))
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

    /// Seals `data_key` in an envelope only this key pair opens, in `context`: the
    /// organisation's own envelope (see the module notes).
    pub fn seal_own(
        &self,
        data_key: &[u8; DATA_KEY_BYTES],
        context: &WrapContext<'_>,
    ) -> Result<WrappedKey, WrapError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| WrapError::Wrap)?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&self.own.seal(nonce, data_key, context));
        Ok(WrappedKey(bytes))
    }

    /// Opens a data key wrapped for this key pair in `context`: an HPKE envelope from any
    /// sender, or one of its own envelopes.
    pub fn unwrap_key(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext<'_>,
    ) -> Result<[u8; DATA_KEY_BYTES], WrapError> {
        let bytes = &wrapped.0;
        if bytes.len() == OWN_ENVELOPE_BYTES {
            let (nonce, sealed) = bytes.split_at(NONCE_LEN);
            let nonce = nonce.try_into().expect("split at the nonce's length");
            return self.own.open(nonce, sealed, context);
        }
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

    /// The key of an answer sent to this key pair under `binding`. Any share gives a key;
    /// only the right one opens the answer's sealed keys.
    pub fn answer_key(
        &self,
        share: &AnswerKeyShare,
        binding: &AnswerBinding<'_>,
    ) -> Result<AnswerKey, WrapError> {
        let encapped = EncappedKey::from_bytes(&share.0).map_err(|_| WrapError::BadWrappedKey)?;
        let context = hpke::setup_receiver::<ExportOnlyAead, HkdfSha256, Suite>(
            &OpModeR::Base,
            &self.secret,
            &encapped,
            &binding.info(),
        )
        .map_err(|_| WrapError::WrongKeyOrContext)?;
        Ok(AnswerKey::exported_from(|out| {
            context.export(ANSWER_EXPORT_LABEL, out)
        }))
    }
}

/// An encryption public key: a SEC1 uncompressed P-256 point, base64url in JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionPublicKey(Vec<u8>);

key_bytes!(EncryptionPublicKey, WrapError::BadPublicKey, |bytes| {
    bytes.len() == PUBLIC_KEY_BYTES && PublicKey::from_bytes(bytes).is_ok()
});

impl EncryptionPublicKey {
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

    /// A fresh key for one answer to the holder of this key, and the share that opens it
    /// for them under the same `binding`.
    pub fn answer_key(
        &self,
        binding: &AnswerBinding<'_>,
    ) -> Result<(AnswerKeyShare, AnswerKey), WrapError> {
        let public = PublicKey::from_bytes(&self.0).map_err(|_| WrapError::BadPublicKey)?;
        let (encapped, context) = hpke::setup_sender::<ExportOnlyAead, HkdfSha256, Suite, _>(
            &OpModeS::Base,
            &public,
            &binding.info(),
            &mut rand_core::UnwrapErr(rand_core::OsRng),
        )
        .map_err(|_| WrapError::Wrap)?;
        let key = AnswerKey::exported_from(|out| context.export(ANSWER_EXPORT_LABEL, out));
        Ok((AnswerKeyShare(encapped.to_bytes().to_vec()), key))
    }
}

/// A data key wrapped for one recipient (base64url in JSON): the HPKE encapsulated key, then
/// the sealed data key; or, for the organisation's own envelope, the nonce, then the sealed
/// data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

key_bytes!(WrappedKey, WrapError::BadWrappedKey, |bytes| {
    bytes.len() == WRAPPED_KEY_BYTES || bytes.len() == OWN_ENVELOPE_BYTES
});

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
    fn an_own_envelope_opens_for_its_key_pair_and_context_only() {
        // Proves the custodian's own envelope: its key pair (rebuilt from the secret bytes
        // too) opens it in its context; another key pair, another context and any flipped
        // byte are refused; two envelopes of one key differ (fresh nonces).
        let custodian = EncryptionKeyPair::generate();
        let data_key = [3u8; DATA_KEY_BYTES];
        let envelope = custodian.seal_own(&data_key, &CONTEXT).unwrap();
        assert_eq!(envelope.as_bytes().len(), OWN_ENVELOPE_BYTES);
        assert_eq!(custodian.unwrap_key(&envelope, &CONTEXT), Ok(data_key));
        let again = EncryptionKeyPair::from_secret_bytes(&custodian.secret_bytes()).unwrap();
        assert_eq!(again.unwrap_key(&envelope, &CONTEXT), Ok(data_key));
        assert_ne!(custodian.seal_own(&data_key, &CONTEXT).unwrap(), envelope);

        let stranger = EncryptionKeyPair::generate();
        assert_eq!(
            stranger.unwrap_key(&envelope, &CONTEXT),
            Err(WrapError::WrongKeyOrContext)
        );
        let other = WrapContext {
            version: 2,
            ..CONTEXT
        };
        assert_eq!(
            custodian.unwrap_key(&envelope, &other),
            Err(WrapError::WrongKeyOrContext)
        );
        for position in 0..OWN_ENVELOPE_BYTES {
            let mut bytes = envelope.as_bytes().to_vec();
            bytes[position] ^= 0x01;
            let tampered = WrappedKey::from_bytes(&bytes).unwrap();
            assert!(
                custodian.unwrap_key(&tampered, &CONTEXT).is_err(),
                "byte {position}"
            );
        }
        let json = serde_json::to_string(&envelope).unwrap();
        assert_eq!(serde_json::from_str::<WrappedKey>(&json).unwrap(), envelope);
        assert_eq!(
            WrappedKey::from_bytes(&[0; OWN_ENVELOPE_BYTES + 1]),
            Err(WrapError::BadWrappedKey)
        );
    }

    #[test]
    fn an_answers_keys_open_for_its_requester_binding_and_positions_only() {
        // Proves the answer key: the requester derives the custodian's key from the share
        // under the same binding and opens each sealed key at its position and context;
        // another key pair, another binding (custodian, requester or access entry), another
        // position or context, a flipped byte of a sealed key, and a share of another answer
        // all fail to open.
        let requester = EncryptionKeyPair::generate();
        let binding = AnswerBinding {
            custodian: "hospital-a",
            requester: "clinic-b",
            access_tx: &[7; 32],
        };
        let context = WrapContext {
            recipient: "clinic-b",
            ..CONTEXT
        };
        let (share, key) = requester.public_key().answer_key(&binding).unwrap();
        let keys: Vec<[u8; DATA_KEY_BYTES]> = (0..3u8).map(|n| [n; DATA_KEY_BYTES]).collect();
        let sealed: Vec<SealedKey> = keys
            .iter()
            .enumerate()
            .map(|(index, data_key)| key.seal(index as u32, data_key, &context))
            .collect();
        assert!(sealed
            .iter()
            .all(|s| s.as_bytes().len() == SEALED_KEY_BYTES));

        let opened = requester.answer_key(&share, &binding).unwrap();
        for (index, data_key) in keys.iter().enumerate() {
            assert_eq!(
                opened.open(index as u32, &sealed[index], &context),
                Ok(*data_key)
            );
        }
        assert!(opened.open(1, &sealed[0], &context).is_err());
        assert!(opened.open(0, &sealed[0], &CONTEXT).is_err());
        for position in 0..SEALED_KEY_BYTES {
            let mut bytes = sealed[0].as_bytes().to_vec();
            bytes[position] ^= 0x01;
            let tampered = SealedKey::from_bytes(&bytes).unwrap();
            assert!(
                opened.open(0, &tampered, &context).is_err(),
                "byte {position}"
            );
        }

        let stranger = EncryptionKeyPair::generate();
        let elsewhere = [
            AnswerBinding {
                custodian: "lab-x",
                ..binding
            },
            AnswerBinding {
                requester: "clinic-c",
                ..binding
            },
            AnswerBinding {
                access_tx: &[8; 32],
                ..binding
            },
        ];
        let mut wrong = vec![stranger.answer_key(&share, &binding).unwrap()];
        for other in &elsewhere {
            wrong.push(requester.answer_key(&share, other).unwrap());
        }
        let (other_share, _) = requester.public_key().answer_key(&binding).unwrap();
        wrong.push(requester.answer_key(&other_share, &binding).unwrap());
        for (n, key) in wrong.iter().enumerate() {
            assert_eq!(
                key.open(0, &sealed[0], &context),
                Err(WrapError::WrongKeyOrContext),
                "case {n}"
            );
        }

        let json = serde_json::to_string(&share).unwrap();
        assert_eq!(
            serde_json::from_str::<AnswerKeyShare>(&json).unwrap(),
            share
        );
        let mut off_curve = share.as_bytes().to_vec();
        off_curve[64] ^= 0x01;
        assert_eq!(
            AnswerKeyShare::from_bytes(&off_curve),
            Err(WrapError::BadWrappedKey)
        );
        assert_eq!(
            SealedKey::from_bytes(&[0; 47]),
            Err(WrapError::BadWrappedKey)
        );
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
