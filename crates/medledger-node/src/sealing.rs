//! Sealing a record version for off-chain storage: encryption with a fresh key, the
//! content id of the ciphertext and the salted commitment to the plaintext.
//!
//! The ledger receives only the content id and the commitment; the ciphertext, the key and
//! the salt stay with the custodian. The salt travels inside the ciphertext, so whoever may
//! decrypt can check the commitment and nobody else can test guesses against it.

use medledger_core::Hash;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of salt in front of the plaintext.
pub const SALT_BYTES: usize = 32;

/// A sealed record version.
pub struct Sealed {
    /// `nonce || AES-256-GCM(key, salt || plaintext)`.
    pub ciphertext: Vec<u8>,
    /// The fresh 256-bit data key of this version.
    pub key: [u8; 32],
    pub salt: [u8; SALT_BYTES],
    /// CIDv1 (raw, sha2-256, base32) of the ciphertext.
    pub cid: String,
    /// SHA-256(salt || plaintext).
    pub commitment: Hash,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the system random generator failed")]
    Random,
    #[error("encryption failed")]
    Crypto,
}

/// What a sealed part is bound to: its custodian, record, version and, for an attachment,
/// its position. A ciphertext opened under any other binding fails.
pub fn associated_data(
    custodian: &str,
    record_id: &str,
    version: u64,
    attachment: Option<usize>,
) -> Vec<u8> {
    let mut out = format!("medledger record v1\n{custodian}/{record_id}/{version}");
    if let Some(index) = attachment {
        out.push_str(&format!("/attachment/{index}"));
    }
    out.into_bytes()
}

/// A fresh 256-bit data key.
pub fn fresh_key() -> Result<[u8; 32], SealError> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| SealError::Random)?;
    Ok(key)
}

/// Encrypts `plaintext` under a fresh key; `associated` binds the ciphertext to its place
/// (record id, version, custodian) so it cannot be passed off as another record.
pub fn seal(plaintext: &[u8], associated: &[u8]) -> Result<Sealed, SealError> {
    seal_with_key(&fresh_key()?, plaintext, associated)
}

/// Encrypts `plaintext` under `key` (a version's data key, shared by the version and its
/// attachments, each under its own random nonce and associated data).
pub fn seal_with_key(
    key: &[u8; 32],
    plaintext: &[u8],
    associated: &[u8],
) -> Result<Sealed, SealError> {
    let random = SystemRandom::new();
    let mut salt = [0u8; SALT_BYTES];
    let mut nonce = [0u8; NONCE_LEN];
    random.fill(&mut salt).map_err(|_| SealError::Random)?;
    random.fill(&mut nonce).map_err(|_| SealError::Random)?;
    let cipher =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| SealError::Crypto)?);
    let mut buffer = Vec::with_capacity(SALT_BYTES + plaintext.len() + 16);
    buffer.extend_from_slice(&salt);
    buffer.extend_from_slice(plaintext);
    cipher
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated),
            &mut buffer,
        )
        .map_err(|_| SealError::Crypto)?;
    let mut ciphertext = nonce.to_vec();
    ciphertext.extend_from_slice(&buffer);
    Ok(Sealed {
        cid: content_id(&ciphertext),
        commitment: Hash::digest_parts(&[&salt, plaintext]),
        ciphertext,
        key: *key,
        salt,
    })
}

/// `salt || plaintext` of a sealed part; None when it does not open under `key` and
/// `associated`.
fn decrypt(ciphertext: &[u8], key: &[u8; 32], associated: &[u8]) -> Option<Vec<u8>> {
    let (nonce, sealed) = ciphertext.split_at_checked(NONCE_LEN)?;
    let cipher = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    let mut buffer = sealed.to_vec();
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let length = cipher
        .open_in_place(nonce, Aad::from(associated), &mut buffer)
        .ok()?
        .len();
    buffer.truncate(length);
    (length >= SALT_BYTES).then_some(buffer)
}

/// Decrypts a sealed part without a commitment to check (an attachment, whose content id
/// the checked resource names); None when it does not open under `key` and `associated`.
pub fn open_part(ciphertext: &[u8], key: &[u8; 32], associated: &[u8]) -> Option<Vec<u8>> {
    decrypt(ciphertext, key, associated).map(|mut plain| plain.split_off(SALT_BYTES))
}

/// Decrypts a sealed version and checks it against its commitment.
pub fn open(
    ciphertext: &[u8],
    key: &[u8; 32],
    associated: &[u8],
    commitment: &Hash,
) -> Option<Vec<u8>> {
    let plain = decrypt(ciphertext, key, associated)?;
    let (salt, plaintext) = plain.split_at(SALT_BYTES);
    (Hash::digest_parts(&[salt, plaintext]) == *commitment).then(|| plaintext.to_vec())
}

/// The CIDv1 IPFS gives a single-chunk raw blob: version 1, codec raw (0x55), multihash
/// sha2-256 (0x12, 32 bytes), in multibase base32 lower case (`b` prefix, RFC 4648, no padding).
pub fn content_id(bytes: &[u8]) -> String {
    let digest = Hash::digest(bytes);
    let mut binary = vec![0x01, 0x55, 0x12, 0x20];
    binary.extend_from_slice(&digest.0);
    format!("b{}", base32_lower(&binary))
}

fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in bytes {
        buffer = (buffer << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_id_matches_the_ipfs_id_of_known_blobs() {
        // `ipfs add --cid-version 1 --raw-leaves` of the empty file and of "hello world\n".
        assert_eq!(
            content_id(b""),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
        assert_eq!(
            content_id(b"hello world\n"),
            "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
        );
        assert!(medledger_core::contracts::is_valid_cid(&content_id(b"x")));
    }

    #[test]
    fn sealed_versions_open_only_with_their_key_place_and_commitment() {
        let sealed = seal(b"{\"resourceType\":\"Observation\"}", b"obs-1/1/hospital-a").unwrap();
        let open_with = |key: &[u8; 32], associated: &[u8], commitment: &Hash| {
            open(&sealed.ciphertext, key, associated, commitment)
        };
        assert_eq!(
            open_with(&sealed.key, b"obs-1/1/hospital-a", &sealed.commitment).as_deref(),
            Some(&b"{\"resourceType\":\"Observation\"}"[..])
        );
        assert_eq!(
            open_with(&[0; 32], b"obs-1/1/hospital-a", &sealed.commitment),
            None
        );
        assert_eq!(
            open_with(&sealed.key, b"obs-1/2/hospital-a", &sealed.commitment),
            None
        );
        assert_eq!(
            open_with(&sealed.key, b"obs-1/1/hospital-a", &Hash::ZERO),
            None
        );
        assert_ne!(
            seal(b"same", b"a").unwrap().cid,
            seal(b"same", b"a").unwrap().cid
        );
    }
}
