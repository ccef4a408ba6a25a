//! X.509 certificates of the consortium: parsing against the ledger's profile and checking
//! one link of a chain.
//!
//! The profile is narrow on purpose:
//!
//! * keys are P-256 (`id-ecPublicKey` with `prime256v1`), signatures `ecdsa-with-SHA256`;
//! * the subject carries O = organisation id (the consortium id for the root), CN = name
//!   (the user or node name for end-entity certificates, free text for CAs) and, on
//!   end-entity certificates only, OU = the role spelling (`"lab_technician"`, ...);
//! * certificates are X.509 v3, at most [`CERT_BYTES_MAX`] bytes of DER, with nothing after
//!   them; the only critical extensions understood are basicConstraints and keyUsage.
//!
//! Pure code: time arrives as unix milliseconds, nothing reads a clock. Every function here
//! returns an error, never panics, whatever the bytes.

use std::str::FromStr;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AlgorithmIdentifier, X509Name, X509Version};

use crate::crypto::PublicKey;
use crate::hash::Hash;
use crate::identity::{is_valid_name, Role};

/// Largest certificate accepted, in bytes of DER.
pub const CERT_BYTES_MAX: usize = 4096;

/// What the ledger reads from a certificate that fits the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the whole DER encoding.
    pub fingerprint: Hash,
    /// Subject O: the organisation id, or the consortium id for the root.
    pub organization: String,
    /// Subject CN: the user or node name for end-entity certificates, free text for CAs.
    pub common_name: String,
    /// Subject OU read as a role; `Some` exactly for end-entity certificates.
    pub role: Option<Role>,
    /// basicConstraints cA = true.
    pub is_ca: bool,
    /// notBefore, unix milliseconds (whole seconds; dates before 1970 read as 0).
    pub not_before_ms: u64,
    /// notAfter, unix milliseconds (whole seconds), inclusive.
    pub not_after_ms: u64,
    /// The subject's key.
    pub public_key: PublicKey,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate is {0} bytes; at most {max} are accepted", max = CERT_BYTES_MAX)]
    TooLarge(usize),
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("unsupported public key: only P-256 (prime256v1) keys are accepted")]
    UnsupportedKey,
    #[error("unsupported signature algorithm: only ecdsa-with-SHA256 is accepted")]
    UnsupportedSignatureAlgorithm,
    #[error("unsupported critical extension {0}")]
    UnsupportedCriticalExtension(String),
    #[error("certificate subject has no {0}")]
    MissingField(&'static str),
    #[error("certificate subject has more than one {0}")]
    DuplicateField(&'static str),
    #[error(
        "certificate subject {field} {value:?} is not a valid name ([a-z0-9-], 1 to 64 bytes)"
    )]
    InvalidName { field: &'static str, value: String },
    #[error("certificate OU {0:?} is not a known role")]
    UnknownRole(String),
    #[error("a CA certificate must not carry a role (OU {0:?})")]
    RoleOnCa(String),
    #[error("the issuing certificate is not a CA (basicConstraints cA is not true, or keyUsage lacks keyCertSign)")]
    NotCa,
    #[error("the certificate's issuer name does not match the issuing certificate's subject")]
    IssuerMismatch,
    #[error("the certificate's signature does not verify under the issuer's key")]
    BadSignature,
    #[error("certificate is not valid before {not_before_ms} ms (checked at {at_ms} ms)")]
    NotYetValid { not_before_ms: u64, at_ms: u64 },
    #[error("certificate expired at {not_after_ms} ms (checked at {at_ms} ms)")]
    Expired { not_after_ms: u64, at_ms: u64 },
}

/// Parses `der` as one certificate of the profile and reads its fields.
///
/// Refuses input over [`CERT_BYTES_MAX`], trailing bytes, anything but a v3 certificate
/// with a P-256 key signed with ecdsa-with-SHA256, a subject without exactly one O and one
/// CN, an O (or an end-entity CN) that is not a valid name, an end-entity certificate
/// without a known role in OU, a CA certificate with an OU, extensions that do not parse,
/// and critical extensions other than basicConstraints and keyUsage. The signature is not
/// checked here: see [`verify_issued_by`].
pub fn parse_certificate(der: &[u8]) -> Result<CertInfo, CertError> {
    parse(der).map(|(_, info)| info)
}

/// Checks one link of a chain: `issuer_der` is a CA (basicConstraints cA = true, and
/// keyCertSign if it has a keyUsage extension), the child's issuer name equals the
/// issuer's subject name byte for byte, and the child's signature verifies under the
/// issuer's key. Both certificates must fit the profile. A root is checked against
/// itself: `verify_issued_by(root, root)`. Validity periods are not looked at; see
/// [`check_valid_at`].
pub fn verify_issued_by(child_der: &[u8], issuer_der: &[u8]) -> Result<(), CertError> {
    let (child, _) = parse(child_der)?;
    let (issuer, issuer_info) = parse(issuer_der)?;
    if !issuer_info.is_ca {
        return Err(CertError::NotCa);
    }
    match issuer.key_usage() {
        Ok(Some(usage)) if !usage.value.key_cert_sign() => return Err(CertError::NotCa),
        Ok(_) => {}
        Err(error) => return Err(malformed(error)),
    }
    if child.issuer().as_raw() != issuer.subject().as_raw() {
        return Err(CertError::IssuerMismatch);
    }
    // Both sides are known to be ecdsa-with-SHA256 and P-256 by now, so any failure here
    // is a signature that does not verify.
    child
        .verify_signature(Some(issuer.public_key()))
        .map_err(|_| CertError::BadSignature)
}

/// Checks that `at_ms` lies within the certificate's validity, both ends inclusive.
pub fn check_valid_at(info: &CertInfo, at_ms: u64) -> Result<(), CertError> {
    if at_ms < info.not_before_ms {
        return Err(CertError::NotYetValid {
            not_before_ms: info.not_before_ms,
            at_ms,
        });
    }
    if at_ms > info.not_after_ms {
        return Err(CertError::Expired {
            not_after_ms: info.not_after_ms,
            at_ms,
        });
    }
    Ok(())
}

fn malformed(error: impl std::fmt::Display) -> CertError {
    CertError::Malformed(error.to_string())
}

fn parse(der: &[u8]) -> Result<(X509Certificate<'_>, CertInfo), CertError> {
    if der.len() > CERT_BYTES_MAX {
        return Err(CertError::TooLarge(der.len()));
    }
    let (rest, cert) = X509Certificate::from_der(der).map_err(malformed)?;
    if !rest.is_empty() {
        return Err(CertError::Malformed(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    if cert.version() != X509Version::V3 {
        return Err(CertError::Malformed("not an X.509 v3 certificate".into()));
    }

    if !is_ecdsa_with_sha256(&cert.signature_algorithm) {
        return Err(CertError::UnsupportedSignatureAlgorithm);
    }
    if cert.tbs_certificate.signature != cert.signature_algorithm {
        return Err(CertError::Malformed(
            "the signed and the outer signature algorithms differ".into(),
        ));
    }
    if cert.signature_value.unused_bits != 0 {
        return Err(CertError::Malformed(
            "signature bit string has unused bits".into(),
        ));
    }

    if canonical_envelope(&cert) != der {
        return Err(CertError::Malformed(
            "the certificate around the signed part is not in canonical DER".into(),
        ));
    }

    let public_key = p256_key(&cert)?;
    let is_ca = read_extensions(&cert)?;
    let (organization, common_name, unit) = read_subject(cert.subject())?;

    if !is_valid_name(&organization) {
        return Err(CertError::InvalidName {
            field: "O",
            value: organization,
        });
    }
    let role = if is_ca {
        if let Some(unit) = unit {
            return Err(CertError::RoleOnCa(unit));
        }
        if common_name.is_empty() {
            return Err(CertError::MissingField("CN"));
        }
        None
    } else {
        let unit = unit.ok_or(CertError::MissingField("OU (role)"))?;
        let role = Role::from_str(&unit).map_err(|_| CertError::UnknownRole(unit))?;
        if !is_valid_name(&common_name) {
            return Err(CertError::InvalidName {
                field: "CN",
                value: common_name,
            });
        }
        Some(role)
    };

    let validity = cert.validity();
    let not_before_ms = unix_ms(validity.not_before.timestamp());
    let not_after_ms = unix_ms(validity.not_after.timestamp());
    if not_before_ms > not_after_ms {
        return Err(CertError::Malformed(
            "validity ends before it begins".into(),
        ));
    }

    let info = CertInfo {
        fingerprint: Hash::digest(der),
        organization,
        common_name,
        role,
        is_ca,
        not_before_ms,
        not_after_ms,
        public_key,
    };
    Ok((cert, info))
}

/// ecdsa-with-SHA256, whose parameters must be absent (RFC 5758 section 3.2).
fn is_ecdsa_with_sha256(algorithm: &AlgorithmIdentifier<'_>) -> bool {
    algorithm.algorithm == OID_SIG_ECDSA_WITH_SHA256 && algorithm.parameters.is_none()
}

/// DER of `AlgorithmIdentifier { ecdsa-with-SHA256 }`, parameters absent.
const ECDSA_WITH_SHA256_DER: [u8; 12] = [
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

/// The certificate re-encoded from its signed part, the one signature algorithm and the
/// signature. The parser tolerates some non-DER tags outside the signed part; requiring
/// the input to equal this encoding keeps unsigned bytes from changing the fingerprint.
/// (The ECDSA signature itself stays malleable: `s` and `n - s` both verify.)
fn canonical_envelope(cert: &X509Certificate<'_>) -> Vec<u8> {
    let signature: &[u8] = &cert.signature_value.data;
    let mut inner = cert.tbs_certificate.as_ref().to_vec();
    inner.extend_from_slice(&ECDSA_WITH_SHA256_DER);
    der_header(&mut inner, 0x03, signature.len() + 1);
    inner.push(0x00);
    inner.extend_from_slice(signature);
    let mut out = Vec::with_capacity(inner.len() + 4);
    der_header(&mut out, 0x30, inner.len());
    out.extend_from_slice(&inner);
    out
}

/// Appends a DER tag and definite, minimal length.
fn der_header(out: &mut Vec<u8>, tag: u8, length: usize) {
    out.push(tag);
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes = length.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn p256_key(cert: &X509Certificate<'_>) -> Result<PublicKey, CertError> {
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CertError::UnsupportedKey);
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|parameters| parameters.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(CertError::UnsupportedKey);
    }
    if spki.subject_public_key.unused_bits != 0 {
        return Err(CertError::UnsupportedKey);
    }
    PublicKey::from_sec1(&spki.subject_public_key.data).map_err(|_| CertError::UnsupportedKey)
}

/// Checks every extension and returns basicConstraints' cA flag (false when absent).
fn read_extensions(cert: &X509Certificate<'_>) -> Result<bool, CertError> {
    // Refuses duplicate extensions.
    cert.extensions_map().map_err(malformed)?;
    for extension in cert.extensions() {
        if let ParsedExtension::ParseError { error } = extension.parsed_extension() {
            return Err(CertError::Malformed(format!(
                "extension {}: {error}",
                extension.oid
            )));
        }
        let understood = extension.oid == OID_X509_EXT_BASIC_CONSTRAINTS
            || extension.oid == OID_X509_EXT_KEY_USAGE;
        if extension.critical && !understood {
            return Err(CertError::UnsupportedCriticalExtension(
                extension.oid.to_id_string(),
            ));
        }
    }
    // keyUsage is parsed here only so that a broken one is refused.
    cert.key_usage().map_err(malformed)?;
    let constraints = cert.basic_constraints().map_err(malformed)?;
    Ok(constraints.is_some_and(|constraints| constraints.value.ca))
}

/// Reads the subject's O, CN and optional OU; each may appear at most once.
fn read_subject(subject: &X509Name<'_>) -> Result<(String, String, Option<String>), CertError> {
    let organization = single(subject.iter_organization(), "O")?;
    let common_name = single(subject.iter_common_name(), "CN")?;
    let unit = single(subject.iter_organizational_unit(), "OU")?;
    Ok((
        organization.ok_or(CertError::MissingField("O"))?,
        common_name.ok_or(CertError::MissingField("CN"))?,
        unit,
    ))
}

fn single<'a, 'b: 'a>(
    mut values: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'b>>,
    field: &'static str,
) -> Result<Option<String>, CertError> {
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(CertError::DuplicateField(field));
    }
    let text = first
        .as_str()
        .map_err(|_| CertError::Malformed(format!("subject {field} is not a text string")))?;
    Ok(Some(text.to_string()))
}

/// Unix seconds to milliseconds; instants before 1970 read as 0.
fn unix_ms(seconds: i64) -> u64 {
    u64::try_from(seconds).unwrap_or(0).saturating_mul(1000)
}
