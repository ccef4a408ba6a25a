//! Key material and certificate issuance: the shell side of the consortium PKI.
//!
//! Keys are P-256, signed with ring; certificates are built with rcgen to the profile that
//! `medledger_core::cert` parses: a self-signed consortium root, one CA per organisation
//! under it, and end-entity certificates (users and nodes) under their organisation's CA,
//! carrying the role in the subject OU.
//!
//! Every certificate issued here is parsed and checked against its issuer with
//! `medledger_core::cert` before it is returned, so a certificate that leaves this module
//! is one the core accepts.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use medledger_core::cert::{self, CertError, CertInfo};
use medledger_core::crypto::{PublicKey, Signature};
use medledger_core::identity::{is_valid_name, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose,
    SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};

/// Latest instant a certificate can name: 9999-12-31T23:59:59.999Z, in unix milliseconds.
pub const VALIDITY_MS_MAX: u64 = 253_402_300_799_999;

const PEM_PRIVATE_KEY: &str = "PRIVATE KEY";
const PEM_CERTIFICATE: &str = "CERTIFICATE";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    #[error("the system random number generator failed")]
    Rng,
    #[error("not a P-256 PKCS#8 private key: {0}")]
    BadKey(String),
    #[error("not a PEM \"{0}\" block")]
    BadPem(&'static str),
    #[error("{field} {value:?} is not a valid name ([a-z0-9-], 1 to 64 bytes)")]
    InvalidName { field: &'static str, value: String },
    #[error("invalid validity: {0}")]
    InvalidValidity(String),
    #[error("the signing key does not belong to the issuing certificate")]
    KeyMismatch,
    #[error("the issuing CA belongs to organisation {ca_org:?}, not {org_id:?}")]
    OrgMismatch { ca_org: String, org_id: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(String),
    #[error(transparent)]
    Cert(#[from] CertError),
}

impl From<rcgen::Error> for PkiError {
    fn from(error: rcgen::Error) -> PkiError {
        PkiError::Rcgen(error.to_string())
    }
}

/// A P-256 signing key. Signatures are the fixed 64-byte `r || s` form that
/// [`PublicKey::verify`] checks.
pub struct KeyPair {
    ring: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    public_key: PublicKey,
    rng: SystemRandom,
}

impl KeyPair {
    /// A fresh key from the system's random number generator.
    pub fn generate() -> Result<KeyPair, PkiError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| PkiError::Rng)?;
        KeyPair::from_pkcs8_der(pkcs8.as_ref())
    }

    /// Reads an unencrypted PKCS#8 (RFC 5958) P-256 private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<KeyPair, PkiError> {
        let rng = SystemRandom::new();
        let ring = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|error| PkiError::BadKey(error.to_string()))?;
        let public_key = PublicKey::from_sec1(ring.public_key().as_ref())
            .map_err(|error| PkiError::BadKey(error.to_string()))?;
        Ok(KeyPair {
            ring,
            pkcs8: der.to_vec(),
            public_key,
            rng,
        })
    }

    /// The PKCS#8 DER encoding, private key included.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key.clone()
    }

    /// ECDSA P-256 SHA-256 signature of `message` in `r || s` form.
    ///
    /// Panics only if the operating system's random number generator fails, which ring
    /// reports as the sole cause of a signing error.
    pub fn sign(&self, message: &[u8]) -> Signature {
        let signature = self
            .ring
            .sign(&self.rng, message)
            .expect("the system random number generator failed while signing");
        Signature::from_bytes(signature.as_ref())
            .expect("ring's fixed P-256 signatures are 64 bytes")
    }

    /// PEM "PRIVATE KEY" (PKCS#8).
    pub fn to_pem(&self) -> String {
        pem_encode(PEM_PRIVATE_KEY, &self.pkcs8)
    }

    /// Reads the first PEM "PRIVATE KEY" block of `text`.
    pub fn from_pem(text: &str) -> Result<KeyPair, PkiError> {
        KeyPair::from_pkcs8_der(&pem_decode(PEM_PRIVATE_KEY, text)?)
    }

    /// The same key as an rcgen signing key, which signs in the ASN.1 form X.509 wants.
    fn to_rcgen(&self) -> Result<rcgen::KeyPair, PkiError> {
        let key = rcgen::KeyPair::try_from(self.pkcs8.as_slice())?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(PkiError::BadKey("rcgen does not read it as P-256".into()));
        }
        Ok(key)
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// A certificate's validity period in unix milliseconds, both ends inclusive. Certificates
/// count whole seconds, so milliseconds are rounded down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// A DER certificate as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub der: Vec<u8>,
}

impl IssuedCert {
    /// PEM "CERTIFICATE".
    pub fn to_pem(&self) -> String {
        pem_encode(PEM_CERTIFICATE, &self.der)
    }

    /// Reads the first PEM "CERTIFICATE" block of `text`. The bytes are not checked; see
    /// [`IssuedCert::info`].
    pub fn from_pem(text: &str) -> Result<IssuedCert, PkiError> {
        Ok(IssuedCert {
            der: pem_decode(PEM_CERTIFICATE, text)?,
        })
    }

    /// The certificate parsed against the ledger's profile.
    pub fn info(&self) -> Result<CertInfo, CertError> {
        cert::parse_certificate(&self.der)
    }
}

/// The consortium's self-signed root: a CA with O = `consortium_id` and CN
/// `"<consortium_id> root"`, allowed one level of CAs below it.
pub fn issue_root(
    consortium_id: &str,
    key: &KeyPair,
    validity: Validity,
) -> Result<IssuedCert, PkiError> {
    check_name("consortium id", consortium_id)?;
    let subject = distinguished_name(consortium_id, None, &format!("{consortium_id} root"));
    let params = certificate_params(
        subject.clone(),
        validity,
        Kind::Ca(BasicConstraints::Constrained(1)),
    )?;
    let der = sign_certificate(&params, &key.public_key, subject, key)?;
    cert::verify_issued_by(&der, &der)?;
    Ok(IssuedCert { der })
}

/// An organisation's CA under the root: O = `org_id`, CN `"<org_id> CA"`, allowed to
/// issue end-entity certificates only.
pub fn issue_org_ca(
    root_key: &KeyPair,
    root_cert: &IssuedCert,
    org_id: &str,
    org_key: &KeyPair,
    validity: Validity,
) -> Result<IssuedCert, PkiError> {
    check_name("organisation id", org_id)?;
    let root = issuer_info(root_key, root_cert)?;
    let subject = distinguished_name(org_id, None, &format!("{org_id} CA"));
    let params = certificate_params(
        subject,
        validity,
        Kind::Ca(BasicConstraints::Constrained(0)),
    )?;
    let issuer = distinguished_name(&root.organization, None, &root.common_name);
    let der = sign_certificate(&params, &org_key.public_key, issuer, root_key)?;
    cert::verify_issued_by(&der, &root_cert.der)?;
    Ok(IssuedCert { der })
}

/// An end-entity certificate (a user or a node) from an organisation's CA: O = `org_id`,
/// OU = the role's spelling, CN = `name`. Only the member's public key is needed; its
/// private key may live elsewhere (a browser, a hardware token).
pub fn issue_member(
    org_ca_key: &KeyPair,
    org_ca_cert: &IssuedCert,
    org_id: &str,
    name: &str,
    role: Role,
    member_public_key: &PublicKey,
    validity: Validity,
) -> Result<IssuedCert, PkiError> {
    check_name("organisation id", org_id)?;
    check_name("name", name)?;
    let ca = issuer_info(org_ca_key, org_ca_cert)?;
    if ca.organization != org_id {
        return Err(PkiError::OrgMismatch {
            ca_org: ca.organization,
            org_id: org_id.to_string(),
        });
    }
    let subject = distinguished_name(org_id, Some(role), name);
    let params = certificate_params(subject, validity, Kind::EndEntity)?;
    let issuer = distinguished_name(&ca.organization, None, &ca.common_name);
    let der = sign_certificate(&params, member_public_key, issuer, org_ca_key)?;
    cert::verify_issued_by(&der, &org_ca_cert.der)?;
    Ok(IssuedCert { der })
}

enum Kind {
    Ca(BasicConstraints),
    EndEntity,
}

fn check_name(field: &'static str, value: &str) -> Result<(), PkiError> {
    if is_valid_name(value) {
        Ok(())
    } else {
        Err(PkiError::InvalidName {
            field,
            value: value.to_string(),
        })
    }
}

/// Parses an issuing certificate and checks that it is a CA and that `key` is its key.
fn issuer_info(key: &KeyPair, issuer_cert: &IssuedCert) -> Result<CertInfo, PkiError> {
    let info = issuer_cert.info()?;
    if !info.is_ca {
        return Err(CertError::NotCa.into());
    }
    if info.public_key != key.public_key {
        return Err(PkiError::KeyMismatch);
    }
    Ok(info)
}

/// The subject name, always in the order O, OU, CN. Issuer names are rebuilt the same way
/// from the issuing certificate, which reproduces its subject byte for byte for every
/// certificate made here; the check after signing catches any other.
fn distinguished_name(
    organization: &str,
    role: Option<Role>,
    common_name: &str,
) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, organization);
    if let Some(role) = role {
        name.push(DnType::OrganizationalUnitName, role.as_str());
    }
    name.push(DnType::CommonName, common_name);
    name
}

fn certificate_params(
    subject: DistinguishedName,
    validity: Validity,
    kind: Kind,
) -> Result<CertificateParams, PkiError> {
    if validity.not_before_ms > validity.not_after_ms {
        return Err(PkiError::InvalidValidity(format!(
            "not_before_ms {} is after not_after_ms {}",
            validity.not_before_ms, validity.not_after_ms
        )));
    }
    if validity.not_after_ms > VALIDITY_MS_MAX {
        return Err(PkiError::InvalidValidity(format!(
            "not_after_ms {} is past the year 9999",
            validity.not_after_ms
        )));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    // rcgen's dates are `time::OffsetDateTime`, reached here without naming the `time`
    // crate: the epoch plus whole seconds (both ends are at most VALIDITY_MS_MAX, so the
    // addition stays in range).
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(validity.not_before_ms / 1000);
    params.not_after = epoch + Duration::from_secs(validity.not_after_ms / 1000);
    params.serial_number = Some(random_serial()?);
    match kind {
        Kind::Ca(constraints) => {
            params.is_ca = IsCa::Ca(constraints);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
        Kind::EndEntity => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
    }
    Ok(params)
}

/// 16 random bytes, high bit clear (positive) and the next bit set (no leading zero), so
/// every serial is exactly 16 bytes of DER content.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Rng)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A P-256 public key given as a bare SEC1 point, for rcgen's subjectPublicKeyInfo.
struct SubjectKey<'a>(&'a PublicKey);

impl rcgen::PublicKeyData for SubjectKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn sign_certificate(
    params: &CertificateParams,
    subject_key: &PublicKey,
    issuer_name: DistinguishedName,
    issuer_key: &KeyPair,
) -> Result<Vec<u8>, PkiError> {
    let mut issuer_params = CertificateParams::default();
    issuer_params.distinguished_name = issuer_name;
    issuer_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = rcgen::Issuer::new(issuer_params, issuer_key.to_rcgen()?);
    let mut params = params.clone();
    // A self-signed root names no other authority.
    params.use_authority_key_identifier_extension = subject_key != &issuer_key.public_key;
    let certificate = params.signed_by(&SubjectKey(subject_key), &issuer)?;
    Ok(certificate.der().to_vec())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(label: &'static str, text: &str) -> Result<Vec<u8>, PkiError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or(PkiError::BadPem(label))? + begin.len();
    let length = text[start..].find(&end).ok_or(PkiError::BadPem(label))?;
    let body: String = text[start..start + length]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD.decode(body).map_err(|_| PkiError::BadPem(label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medledger_core::cert::{
        check_valid_at, parse_certificate, verify_issued_by, CERT_BYTES_MAX,
    };
    use medledger_core::hash::Hash;

    const START_MS: u64 = 1_700_000_000_000;
    const END_MS: u64 = 1_900_000_000_000;
    const VALIDITY: Validity = Validity {
        not_before_ms: START_MS,
        not_after_ms: END_MS,
    };

    struct Chain {
        root_key: KeyPair,
        root: IssuedCert,
        org_key: KeyPair,
        org_ca: IssuedCert,
        alice_key: KeyPair,
        alice: IssuedCert,
    }

    fn chain(consortium: &str) -> Chain {
        let root_key = KeyPair::generate().unwrap();
        let root = issue_root(consortium, &root_key, VALIDITY).unwrap();
        let org_key = KeyPair::generate().unwrap();
        let org_ca = issue_org_ca(&root_key, &root, "st-marys", &org_key, VALIDITY).unwrap();
        let alice_key = KeyPair::generate().unwrap();
        let alice = issue_member(
            &org_key,
            &org_ca,
            "st-marys",
            "alice",
            Role::Clinician,
            &alice_key.public_key(),
            VALIDITY,
        )
        .unwrap();
        Chain {
            root_key,
            root,
            org_key,
            org_ca,
            alice_key,
            alice,
        }
    }

    #[test]
    fn a_root_org_ca_clinician_chain_parses_with_the_right_fields_and_verifies_link_by_link() {
        // Proves that the three issuers produce certificates the core reads back field for
        // field, that each link verifies, and that validity is enforced at both ends.
        let c = chain("medledger-test");

        let root = parse_certificate(&c.root.der).unwrap();
        assert_eq!(root.organization, "medledger-test");
        assert_eq!(root.common_name, "medledger-test root");
        assert_eq!(root.role, None);
        assert!(root.is_ca);
        assert_eq!(root.public_key, c.root_key.public_key());
        assert_eq!(root.fingerprint, Hash::digest(&c.root.der));

        let org = parse_certificate(&c.org_ca.der).unwrap();
        assert_eq!(org.organization, "st-marys");
        assert_eq!(org.common_name, "st-marys CA");
        assert_eq!(org.role, None);
        assert!(org.is_ca);
        assert_eq!(org.public_key, c.org_key.public_key());

        let alice = c.alice.info().unwrap();
        assert_eq!(alice.organization, "st-marys");
        assert_eq!(alice.common_name, "alice");
        assert_eq!(alice.role, Some(Role::Clinician));
        assert!(!alice.is_ca);
        assert_eq!(alice.public_key, c.alice_key.public_key());
        assert_eq!(alice.fingerprint, Hash::digest(&c.alice.der));
        assert_eq!(
            (alice.not_before_ms, alice.not_after_ms),
            (START_MS, END_MS)
        );

        verify_issued_by(&c.root.der, &c.root.der).unwrap();
        verify_issued_by(&c.org_ca.der, &c.root.der).unwrap();
        verify_issued_by(&c.alice.der, &c.org_ca.der).unwrap();
        // Links cannot be skipped or reversed.
        assert_eq!(
            verify_issued_by(&c.alice.der, &c.root.der),
            Err(CertError::IssuerMismatch)
        );
        assert_eq!(
            verify_issued_by(&c.root.der, &c.org_ca.der),
            Err(CertError::IssuerMismatch)
        );

        for info in [&root, &org, &alice] {
            check_valid_at(info, START_MS).unwrap();
            check_valid_at(info, (START_MS + END_MS) / 2).unwrap();
            check_valid_at(info, END_MS).unwrap();
            assert_eq!(
                check_valid_at(info, START_MS - 1),
                Err(CertError::NotYetValid {
                    not_before_ms: START_MS,
                    at_ms: START_MS - 1
                })
            );
            assert_eq!(
                check_valid_at(info, END_MS + 1),
                Err(CertError::Expired {
                    not_after_ms: END_MS,
                    at_ms: END_MS + 1
                })
            );
        }

        // Every role round-trips through OU, including nodes.
        for role in Role::ALL {
            let key = KeyPair::generate().unwrap();
            let cert = issue_member(
                &c.org_key,
                &c.org_ca,
                "st-marys",
                "member-1",
                role,
                &key.public_key(),
                VALIDITY,
            )
            .unwrap();
            assert_eq!(cert.info().unwrap().role, Some(role));
        }
    }

    #[test]
    fn certificates_from_a_different_root_do_not_verify() {
        // Proves that a second consortium's chain, even one with identical names, is not
        // accepted under the first root: same names fail on the signature, different names
        // on the issuer name.
        let ours = chain("medledger-test");
        let twin = chain("medledger-test");
        let other = chain("other-consortium");

        assert_eq!(
            verify_issued_by(&twin.org_ca.der, &ours.root.der),
            Err(CertError::BadSignature)
        );
        assert_eq!(
            verify_issued_by(&twin.alice.der, &ours.org_ca.der),
            Err(CertError::BadSignature)
        );
        assert_eq!(
            verify_issued_by(&other.org_ca.der, &ours.root.der),
            Err(CertError::IssuerMismatch)
        );
        assert_eq!(
            verify_issued_by(&twin.root.der, &ours.root.der),
            Err(CertError::BadSignature)
        );

        // The issuing functions refuse a key that is not the issuing certificate's.
        assert_eq!(
            issue_org_ca(&twin.root_key, &ours.root, "lab-1", &ours.org_key, VALIDITY),
            Err(PkiError::KeyMismatch)
        );
    }

    #[test]
    fn a_user_certificate_used_as_an_issuer_is_refused() {
        // Proves that an end-entity certificate cannot act as a CA: a certificate signed
        // with the user's own key under the user's exact name still fails with NotCa, and
        // the issuing functions refuse a user certificate as the CA.
        let c = chain("medledger-test");
        let mallory = KeyPair::generate().unwrap();
        let params = certificate_params(
            distinguished_name("st-marys", Some(Role::Clinician), "mallory"),
            VALIDITY,
            Kind::EndEntity,
        )
        .unwrap();
        let forged = sign_certificate(
            &params,
            &mallory.public_key(),
            distinguished_name("st-marys", Some(Role::Clinician), "alice"),
            &c.alice_key,
        )
        .unwrap();
        parse_certificate(&forged).unwrap();
        assert_eq!(
            verify_issued_by(&forged, &c.alice.der),
            Err(CertError::NotCa)
        );

        assert_eq!(
            issue_member(
                &c.alice_key,
                &c.alice,
                "st-marys",
                "mallory",
                Role::OrgAdmin,
                &mallory.public_key(),
                VALIDITY,
            ),
            Err(PkiError::Cert(CertError::NotCa))
        );
        assert_eq!(
            issue_org_ca(&c.alice_key, &c.alice, "evil", &mallory, VALIDITY),
            Err(PkiError::Cert(CertError::NotCa))
        );
    }

    #[test]
    fn a_tampered_certificate_is_refused() {
        // Proves that changing the signature or the signed part of a certificate makes it
        // fail: one byte of the signature, the subject's name, the subject's key, and then
        // every single-bit flip (and byte inversion) anywhere in the DER, including the
        // unsigned envelope, whose lax tags would otherwise change the fingerprint.
        let c = chain("medledger-test");
        let der = &c.alice.der;

        let mut signature_flipped = der.clone();
        *signature_flipped.last_mut().unwrap() ^= 0x01;
        assert_eq!(
            verify_issued_by(&signature_flipped, &c.org_ca.der),
            Err(CertError::BadSignature)
        );

        let name_at = find(der, b"alice");
        let mut renamed = der.clone();
        renamed[name_at] = b'b';
        assert_eq!(parse_certificate(&renamed).unwrap().common_name, "blice");
        assert_eq!(
            verify_issued_by(&renamed, &c.org_ca.der),
            Err(CertError::BadSignature)
        );

        let key_at = find(der, c.alice_key.public_key().as_bytes());
        let mut rekeyed = der.clone();
        rekeyed[key_at + 40] ^= 0x80;
        assert!(verify_issued_by(&rekeyed, &c.org_ca.der).is_err());

        let mut survivors = Vec::new();
        for position in 0..der.len() {
            for mask in [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
                let mut tampered = der.clone();
                tampered[position] ^= mask;
                if verify_issued_by(&tampered, &c.org_ca.der).is_ok() {
                    survivors.push((position, der[position], mask));
                }
            }
        }
        assert!(
            survivors.is_empty(),
            "still verify: {survivors:?} of {}",
            hex::encode(der)
        );
    }

    #[test]
    fn parsing_arbitrary_bytes_returns_an_error_and_never_panics() {
        // Proves that garbage, every truncation of a real certificate, the empty input,
        // trailing bytes and oversized input all come back as errors.
        let c = chain("medledger-test");
        let der = &c.alice.der;

        assert!(parse_certificate(&[]).is_err());
        for length in 0..der.len() {
            assert!(
                parse_certificate(&der[..length]).is_err(),
                "prefix {length}"
            );
            assert!(verify_issued_by(&der[..length], &c.org_ca.der).is_err());
            assert!(
                verify_issued_by(der, &c.org_ca.der[..length.min(c.org_ca.der.len())]).is_err()
            );
        }

        let mut trailing = der.clone();
        trailing.push(0);
        assert!(matches!(
            parse_certificate(&trailing),
            Err(CertError::Malformed(_))
        ));

        let huge = vec![0x30; CERT_BYTES_MAX + 1];
        assert_eq!(
            parse_certificate(&huge),
            Err(CertError::TooLarge(CERT_BYTES_MAX + 1))
        );
        let mut padded = der.clone();
        padded.resize(CERT_BYTES_MAX + 1, 0);
        assert_eq!(
            parse_certificate(&padded),
            Err(CertError::TooLarge(CERT_BYTES_MAX + 1))
        );

        // Deterministic pseudo-random garbage, some of it starting like a certificate.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..2000 {
            let length = (next() % 600) as usize;
            let mut bytes: Vec<u8> = (0..length).map(|_| next() as u8).collect();
            if round % 2 == 0 && !bytes.is_empty() {
                let keep = length.min(der.len()) / 2;
                bytes[..keep].copy_from_slice(&der[..keep]);
            }
            assert!(parse_certificate(&bytes).is_err());
        }
    }

    #[test]
    fn certificates_outside_the_profile_are_refused() {
        // Proves that keys other than P-256 and signatures other than ecdsa-with-SHA256 are
        // refused even when the certificate is otherwise well formed.
        let c = chain("medledger-test");

        // A P-384 subject key, signed correctly by a P-256 CA.
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let params = certificate_params(
            distinguished_name("st-marys", Some(Role::Nurse), "bob"),
            VALIDITY,
            Kind::EndEntity,
        )
        .unwrap();
        let mut issuer_params = CertificateParams::default();
        issuer_params.distinguished_name = distinguished_name("st-marys", None, "st-marys CA");
        let issuer = rcgen::Issuer::new(issuer_params, c.org_key.to_rcgen().unwrap());
        let p384_cert = params.signed_by(&p384, &issuer).unwrap();
        assert_eq!(
            parse_certificate(p384_cert.der()),
            Err(CertError::UnsupportedKey)
        );

        // An Ed25519 self-signed CA.
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed_params = certificate_params(
            distinguished_name("medledger-test", None, "ed root"),
            VALIDITY,
            Kind::Ca(BasicConstraints::Unconstrained),
        )
        .unwrap();
        let ed_cert = ed_params.self_signed(&ed).unwrap();
        assert_eq!(
            parse_certificate(ed_cert.der()),
            Err(CertError::UnsupportedSignatureAlgorithm)
        );

        // An end-entity certificate without a role, and one with an unknown role.
        let key = KeyPair::generate().unwrap();
        let mut no_role = DistinguishedName::new();
        no_role.push(DnType::OrganizationName, "st-marys");
        no_role.push(DnType::CommonName, "carol");
        let params = certificate_params(no_role, VALIDITY, Kind::EndEntity).unwrap();
        let issuer_name = distinguished_name("st-marys", None, "st-marys CA");
        let der =
            sign_certificate(&params, &key.public_key(), issuer_name.clone(), &c.org_key).unwrap();
        assert_eq!(
            parse_certificate(&der),
            Err(CertError::MissingField("OU (role)"))
        );

        let mut bad_role = DistinguishedName::new();
        bad_role.push(DnType::OrganizationName, "st-marys");
        bad_role.push(DnType::OrganizationalUnitName, "surgeon");
        bad_role.push(DnType::CommonName, "carol");
        let params = certificate_params(bad_role, VALIDITY, Kind::EndEntity).unwrap();
        let der = sign_certificate(&params, &key.public_key(), issuer_name, &c.org_key).unwrap();
        assert_eq!(
            parse_certificate(&der),
            Err(CertError::UnknownRole("surgeon".into()))
        );
    }

    #[test]
    fn issuance_refuses_bad_names_foreign_organisations_and_bad_validity() {
        // Proves that the issuing functions check their inputs instead of producing a
        // certificate the core would refuse.
        let c = chain("medledger-test");
        let key = KeyPair::generate().unwrap();
        let member = |org: &str, name: &str, validity: Validity| {
            issue_member(
                &c.org_key,
                &c.org_ca,
                org,
                name,
                Role::Nurse,
                &key.public_key(),
                validity,
            )
        };
        assert!(matches!(
            member("st-marys", "Alice Smith", VALIDITY),
            Err(PkiError::InvalidName { field: "name", .. })
        ));
        assert_eq!(
            member("other-org", "dave", VALIDITY),
            Err(PkiError::OrgMismatch {
                ca_org: "st-marys".into(),
                org_id: "other-org".into()
            })
        );
        let backwards = Validity {
            not_before_ms: END_MS,
            not_after_ms: START_MS,
        };
        assert!(matches!(
            member("st-marys", "dave", backwards),
            Err(PkiError::InvalidValidity(_))
        ));
        let far = Validity {
            not_before_ms: 0,
            not_after_ms: VALIDITY_MS_MAX,
        };
        let cert = member("st-marys", "dave", far).unwrap();
        assert_eq!(cert.info().unwrap().not_after_ms, VALIDITY_MS_MAX - 999);
        let too_far = Validity {
            not_before_ms: 0,
            not_after_ms: VALIDITY_MS_MAX + 1,
        };
        assert!(matches!(
            member("st-marys", "dave", too_far),
            Err(PkiError::InvalidValidity(_))
        ));
        assert!(matches!(
            issue_root("Not Valid", &key, VALIDITY),
            Err(PkiError::InvalidName { .. })
        ));
    }

    #[test]
    fn keys_and_certificates_round_trip_through_pem_and_signatures_verify_in_the_core() {
        // Proves that a key survives PEM and PKCS#8 unchanged, that its signatures verify
        // with the core's PublicKey::verify, and that certificates survive PEM.
        let key = KeyPair::generate().unwrap();
        let pem = key.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(pem.ends_with("-----END PRIVATE KEY-----\n"));
        let back = KeyPair::from_pem(&pem).unwrap();
        assert_eq!(back.pkcs8_der(), key.pkcs8_der());
        assert_eq!(back.public_key(), key.public_key());
        let again = KeyPair::from_pkcs8_der(key.pkcs8_der()).unwrap();
        assert_eq!(again.public_key(), key.public_key());

        let signature = back.sign(b"record 42");
        assert!(key.public_key().verify(b"record 42", &signature));
        assert!(!key.public_key().verify(b"record 43", &signature));
        let other = KeyPair::generate().unwrap();
        assert!(!other.public_key().verify(b"record 42", &signature));
        assert!(!format!("{key:?}").contains(&STANDARD.encode(key.pkcs8_der())));

        let c = chain("medledger-test");
        let cert_pem = c.alice.to_pem();
        assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(IssuedCert::from_pem(&cert_pem).unwrap(), c.alice);
        assert_eq!(
            IssuedCert::from_pem(&cert_pem.replace('\n', "\r\n")).unwrap(),
            c.alice
        );

        assert_eq!(
            KeyPair::from_pem(&cert_pem).unwrap_err(),
            PkiError::BadPem("PRIVATE KEY")
        );
        assert_eq!(
            IssuedCert::from_pem(&pem).unwrap_err(),
            PkiError::BadPem("CERTIFICATE")
        );
        assert!(matches!(
            KeyPair::from_pkcs8_der(&c.alice.der),
            Err(PkiError::BadKey(_))
        ));
        assert!(matches!(
            KeyPair::from_pkcs8_der(&[]),
            Err(PkiError::BadKey(_))
        ));
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            KeyPair::from_pkcs8_der(&p384.serialize_der()),
            Err(PkiError::BadKey(_))
        ));
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|window| window == needle)
            .unwrap()
    }
}
